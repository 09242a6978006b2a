"""How long PID 1 waits when it stops things: defaults of sandbox.json's `stop_grace_s` and
`exit_grace_s`. No imports, so that the host imports it too (sandbox.supervisor.timing): a
container stop must outlast PID 1's own stop of the runtime (sandbox/lifecycle/runtime.py)."""

STOP_GRACE_S = 10.0  # SIGTERM → SIGKILL of the agent's (runtime's) process group
EXIT_GRACE_S = 2.0  # agent gone → its remaining children (orphans) get this long, then SIGKILL
