"""In-sandbox supervisor: PID 1 of every sandbox. Stdlib only (Python 3.11), run read-only as
`python3 -I /opt/appliance/supervisor/init.py` by the non-root agent uid.

Order of work, and why:
1. refuse root; remove the previous run's report (a stopped or killed container leaves its last
   one behind: until this run writes its own, the host must find none rather than a stale one);
   no_new_privs, not dumpable (the agent shares our uid: no /proc/1/mem, no ptrace), empty the
   capability bounding set as far as we are allowed;
2. bind the forwarders' listeners (before Landlock: binding is a Landlock right): TCP
   127.0.0.1:3128 for egress and, for an always-on runtime, the agent socket (unix, 0600); read
   the runtime's secret env file;
3. restrict PID 1 itself with Landlock (see `own_rules`), while still single-threaded, because
   restrict_self only covers the calling thread;
4. fork the agent: setsid, restrict further with the policy's ruleset, report its own
   /proc/self/status through a pipe, then wait for "go" (spawn.py);
5. write the enforcement report, start the forwarder threads (forward.py), say "go": the agent
   execs;
6. reap every child, forward signals to the agent's process group, exit with its code; or, with
   `runtime`/`checkin` in sandbox.json, keep the runtime up and fail closed (runtime.py).

`init.py exec [--env K=V]... -- CMD...` is the other entry point: what `podman exec` runs for
`appliance sandbox exec` and agent turns. An exec'd process is not PID 1's descendant, so it would
escape the agent's Landlock domain; this applies the same ruleset (same hard_requirement rule),
then execs CMD with the agent's environment (never the runtime's secret env file).

PID 1's own domain: every policy rule plus read on the stdlib, this directory and /proc, write
on the report directory, and connect to the runtime's port for the agent socket's forwarder
(`own_net`): the agent's domain may bind that port but not connect to it, so the agent cannot
drive its own runtime around the control plane. A child's domain can only narrow its parent's,
so PID 1's domain must be a superset of the agent's; the point is that a compromised PID 1 (say
through a forwarder) gains nothing beyond the agent's view but the report file and that port.
Connecting to the egress unix socket is not a Landlock-controlled action up to ABI 7 (ABI 6
scopes *abstract* sockets only), and a future unix-socket right stays allowed because we only
handle the rights we know, so the forwarder keeps working. Both domains set the signal and
abstract-socket scopes (ABI >= 6): the agent cannot signal PID 1 or reach abstract sockets
outside its domain.

The agent socket's peers (`agent_socket.peers`): the socket's path is reachable from inside the
sandbox and a unix connect() is not a Landlock right, so PID 1 checks who connects. "outside"
(the default) admits only a peer outside PID 1's pid namespace (SO_PEERCRED pid 0: the host's
control plane) and refuses every process of the sandbox (closed unanswered, counted in the
report's `agent_socket.refused`, logged at most once per 10 s). That test means something only
when PID 1 is the init of its own pid namespace, as in every sandbox; a supervisor that is not
(getpid() != 1) refuses to start with "outside" rather than guess. "any" turns the check off: only
for tests that run the supervisor as a plain process (host and "sandbox" share one namespace).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, NoReturn

# -I implies -P: our directory is not on sys.path. It is a read-only mount: adding it is safe.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import landlock
from config import DEFAULT_CONFIG, load_config, read_runtime_env
from forward import (
    Forwarder,
    bind_tcp_listener,
    bind_unix_listener,
    outside_only,
    tcp_upstream,
    unix_upstream,
)
from log import EXIT_CONFIG, EXIT_LANDLOCK, EXIT_SPAWN, die, log
from procs import reap, stop_the_rest
from report import agent_fields, base_report, write_report
from runtime import Runtime
from spawn import FORWARDED, SCOPES, STOPPING, Launch, enforcement_error

PR_SET_DUMPABLE, PR_CAPBSET_DROP = 4, 24
PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER = 38, 36
REPORT_FILE_RIGHTS = ["read_file", "write_file", "read_dir", "make_reg", "remove_file", "truncate"]


def harden_self() -> None:
    """no_new_privs, non-dumpable, bounding set emptied where we may (EPERM without CAP_SETPCAP)."""
    landlock.prctl(PR_SET_NO_NEW_PRIVS, 1)
    landlock.prctl(PR_SET_DUMPABLE, 0)
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
    except (OSError, ValueError):
        last = 63
    for cap in range(last + 1):
        with contextlib.suppress(OSError):  # EPERM: not ours to drop; EINVAL: unknown cap
            landlock.prctl(PR_CAPBSET_DROP, cap)


def own_rules(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """PID 1's Landlock rules: a superset of the agent's (see the module docstring)."""
    here = os.path.dirname(os.path.abspath(__file__))
    read = ["read_file", "read_dir"]
    return [
        *cfg["landlock"]["fs"],
        {"path": os.path.dirname(os.__file__), "access": read},  # lazy imports, tracebacks
        {"path": here, "access": read},
        {"path": "/proc", "access": read},  # finding children to stop at exit
        {"path": os.path.dirname(cfg["report_path"]), "access": REPORT_FILE_RIGHTS},
    ]


def own_net(cfg: dict[str, Any]) -> dict[str, list[int]]:
    """The policy's ports, plus connect to the runtime's port for the agent socket's forwarder
    (the agent's own domain gets only what the policy says)."""
    net = cfg["landlock"]["net"]
    sock = cfg["agent_socket"]
    if sock is None:
        return net
    return {**net, "connect_tcp": [*net.get("connect_tcp", []), sock["port"]]}


def supervise(agent: int, cfg: dict[str, Any], tick: Callable[[], None]) -> int:
    """Without `runtime`/`checkin`: wait for the agent, forwarding signals; its exit code."""
    stop_at: float | None = None
    while True:
        info = signal.sigtimedwait({*FORWARDED, signal.SIGCHLD}, 0.5)
        tick()
        if info is not None and info.si_signo in FORWARDED:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(agent, info.si_signo)
            if info.si_signo in STOPPING and stop_at is None:
                stop_at = time.monotonic() + float(cfg["stop_grace_s"])
        status = reap(agent)
        if status is not None:
            break
        if stop_at is not None and time.monotonic() > stop_at:
            log("agent ignored the stop signal: SIGKILL to its process group")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(agent, signal.SIGKILL)
            stop_at = float("inf")
    code = os.waitstatus_to_exitcode(status)
    stop_the_rest(float(cfg["exit_grace_s"]))
    return 128 - code if code < 0 else code  # killed by signal N → 128+N, like a shell


def exec_main(args: list[str]) -> NoReturn:
    """Run CMD inside the agent's Landlock domain (see the module docstring)."""
    if os.getuid() == 0 or os.geteuid() == 0:
        die(EXIT_CONFIG, "refusing to run as root: exec as the agent uid")
    extra: dict[str, str] = {}
    while args and args[0] != "--":
        if args[0] != "--env" or len(args) < 2 or "=" not in args[1]:
            die(EXIT_CONFIG, "usage: init.py exec [--env K=V]... -- CMD...")
        key, _, value = args[1].partition("=")
        extra[key] = value
        args = args[2:]
    command = args[1:]
    if not command:
        die(EXIT_CONFIG, "usage: init.py exec [--env K=V]... -- CMD...")
    cfg = load_config(os.environ.get("APPLIANCE_SANDBOX_CONFIG", DEFAULT_CONFIG))
    landlock.prctl(PR_SET_NO_NEW_PRIVS, 1)
    ll = cfg["landlock"]
    abi, why = landlock.probe_abi()
    hard = ll["compatibility"] == "hard_requirement"
    if hard and abi < int(ll["min_abi"]):
        die(EXIT_LANDLOCK, why or f"kernel Landlock ABI {abi} < required {ll['min_abi']}")
    with contextlib.suppress(OSError):
        os.chdir(cfg["cwd"])
    try:
        outcome = landlock.restrict(abi, ll["fs"], ll["net"], SCOPES)
    except ValueError as exc:
        die(EXIT_LANDLOCK, str(exc))
    if not outcome.enforced:
        if hard:
            die(EXIT_LANDLOCK, f"Landlock not enforced, {command[0]!r} not run: {outcome.error}")
        log(f"WARNING: Landlock NOT ENFORCED AT ALL (best_effort): {outcome.error}")
    try:
        os.execvpe(command[0], command, {**cfg["env"], **extra})
    except OSError as exc:
        die(127, f"cannot run {command[0]!r}: {exc}")


def bind_listeners(cfg: dict[str, Any]) -> list[Forwarder]:
    """Both forwarders, bound (not yet serving); a bind failure exits 2."""
    try:
        egress = bind_tcp_listener(cfg["listen"])
    except (OSError, ValueError) as exc:
        die(EXIT_CONFIG, f"cannot listen on {cfg['listen']}: {exc}")
    path = cfg["egress_socket"]
    out = [Forwarder("forwarder", egress, unix_upstream(path), f"egress socket {path}", 0.0)]
    sock: dict[str, Any] | None = cfg["agent_socket"]
    if sock is not None:
        outside = sock["peers"] == "outside"
        if outside and os.getpid() != 1:
            die(
                EXIT_CONFIG,
                f"agent_socket.peers 'outside' needs the supervisor to be PID 1 of its own pid "
                f"namespace (its pid is {os.getpid()}): it cannot tell the host from the sandbox",
            )
        try:
            listener: socket.socket = bind_unix_listener(sock["path"])
        except OSError as exc:
            die(EXIT_CONFIG, f"cannot bind the agent socket {sock['path']}: {exc}")
        target = f"the runtime on 127.0.0.1:{sock['port']}"
        admit = outside_only if outside else None
        upstream = tcp_upstream(sock["port"])
        out.append(Forwarder("agent socket", listener, upstream, target, 10.0, admit))
    return out


def refusal_counter(
    report: dict[str, Any], path: str, forwarders: list[Forwarder]
) -> Callable[[], None]:
    """The main loops' tick: the agent socket's refusals into the report (written from the main
    thread only, like every other change), at most once per tick."""
    found = [f for f in forwarders if f.admit is not None]
    if not found:
        return lambda: None
    section = report["agent_socket"]

    def tick() -> None:
        if found[0].refused != section["refused"]:
            section["refused"] = found[0].refused
            write_report(path, report)

    return tick


def main() -> int:
    if sys.argv[1:2] == ["exec"]:
        exec_main(sys.argv[2:])
    if os.getuid() == 0 or os.geteuid() == 0:
        die(
            EXIT_CONFIG,
            "refusing to run as root: the sandbox must start the supervisor as the "
            "agent uid (podman --user)",
        )
    cfg = load_config(os.environ.get("APPLIANCE_SANDBOX_CONFIG", DEFAULT_CONFIG))
    with contextlib.suppress(FileNotFoundError):  # the previous run's (step 1 above)
        os.unlink(cfg["report_path"])
    harden_self()
    if os.getpid() != 1:  # outside a PID namespace (tests): orphans still come to us
        landlock.prctl(PR_SET_CHILD_SUBREAPER, 1)
    ll, report_path = cfg["landlock"], cfg["report_path"]
    hard = ll["compatibility"] == "hard_requirement"
    forwarders = bind_listeners(cfg)
    env = dict(cfg["env"])
    if cfg["runtime_env_file"]:  # the runtime's only: `init.py exec` never reads it
        env.update(read_runtime_env(cfg["runtime_env_file"]))
    abi, why = landlock.probe_abi()
    report = base_report(cfg, abi)
    if cfg["agent_socket"] is not None:
        report["agent_socket"] = {"peers": cfg["agent_socket"]["peers"], "refused": 0}
    tick = refusal_counter(report, report_path, forwarders)
    service = Runtime(cfg, abi, env, report, tick) if cfg["runtime"] or cfg["checkin"] else None

    def refuse(reason: str) -> int:
        if service is not None:
            return service.refuse(reason)
        report["landlock"]["error"] = reason
        write_report(report_path, report)
        log(f"agent NOT started (Landlock {ll['compatibility']}): {reason}")
        return EXIT_LANDLOCK

    if hard and abi < int(ll["min_abi"]):
        return refuse(why or f"kernel Landlock ABI {abi} < required {ll['min_abi']}")
    try:
        own = landlock.restrict(abi, own_rules(cfg), own_net(cfg), SCOPES)
    except ValueError as exc:  # a rule the kernel cannot take: refuse whatever the mode
        return refuse(str(exc))
    report["supervisor_landlock"] = asdict(own)
    if hard and not own.enforced:
        return refuse(f"supervisor: {own.error}")
    # Blocked, with handlers (a PID-namespace init drops SIG_DFL signals): taken by sigtimedwait.
    for sig in (*FORWARDED, signal.SIGCHLD):
        signal.signal(sig, lambda *_: None)
    signal.pthread_sigmask(signal.SIG_BLOCK, {*FORWARDED, signal.SIGCHLD})
    agent = Launch(cfg, abi, env)  # still single-threaded: the forwarders start after this
    if agent.report is None:
        report["landlock"]["error"] = "agent setup failed before reporting"
        if service is not None:
            service.set_state("failed", report["landlock"]["error"])
        write_report(report_path, report)
        return EXIT_SPAWN
    report.update(agent_fields(agent.report))
    error = enforcement_error(agent.report["landlock"], ll, abi, why)
    if error:
        agent.cancel()  # the child exits without exec
        return refuse(error)
    for forwarder in forwarders:
        forwarder.start()
    if service is not None:
        return service.run(agent)
    report["agent_started"] = True
    write_report(report_path, report)
    agent.go()
    return supervise(agent.pid, cfg, tick)


if __name__ == "__main__":
    sys.exit(main())
