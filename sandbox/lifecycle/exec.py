"""`appliance sandbox exec`: a command in a sandbox as the agent, its stdin fed whole, its output
returned whole and capped (the control plane's API; not a terminal session, not a stream).

podman-py's `exec_run` cannot write to the command's stdin, so this runs the Podman client
itself against the service user's API socket (`podman --remote exec -i`, as root). The exit
status is the command's (125-127 are Podman's own: no such container, not executable, not
found). The command still starts through the supervisor's `exec` mode: seccomp, no capabilities
and the agent's Landlock domain. Output past the cap is not read: the command is stopped (the
client, and by the mark in its environment the command itself: `stop_marked`) and the result
says `truncated`, so a `yes` cannot fill the control plane's memory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from sandbox.compile.podman_spec import SUPERVISOR_ENTRYPOINT

if TYPE_CHECKING:
    from sandbox.lifecycle.manager import SandboxManager

OUTPUT_CAP = 8 << 20  # bytes of stdout, and of stderr, kept per exec
EXEC_MARK = "APPLIANCE_EXEC_MARK"  # in an exec'd command's environment: which exec it is
_CHUNK = 1 << 16


def exec_argv(
    m: SandboxManager, name: str, command: list[str], mark: str | None = None
) -> list[str]:
    """The `podman --remote exec -i` argv for `command` in sandbox `name` (as the agent);
    `mark` goes into its environment, for `stop_marked`."""
    record = m.record(name)  # an unknown name: SandboxNotFound with a hint
    _rev, policy = m.policy(name)
    m.require_service()
    marked = ["--env", f"{EXEC_MARK}={mark}"] if mark is not None else []
    return [
        m.podman.podman, "--remote", "--url", m.podman.base_url,
        "exec", "-i", "--user", f"{policy.process.uid}:{policy.process.gid}",
        record.container_id or name,
        *SUPERVISOR_ENTRYPOINT, "exec", *marked, "--", *command,
    ]  # fmt: skip


def stop_marked(mark: str, proc: Path = Path("/proc"), rounds: int = 5) -> int:
    """SIGKILL every process whose environment carries `mark` (an exec's command and what it
    started); how many. Stopping the Podman client leaves the exec session running in the
    container, so this is how a truncated or timed-out exec is really stopped (as root, from
    the host, which sees the sandbox's processes). Rounds: a child forked meanwhile."""
    needle = f"{EXEC_MARK}={mark}".encode()
    killed = 0
    for _ in range(rounds):
        found = 0
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if needle not in (entry / "environ").read_bytes().split(b"\0"):
                    continue
                os.kill(int(entry.name), signal.SIGKILL)
            except (OSError, ValueError):  # gone meanwhile, or not ours to read
                continue
            found += 1
        killed += found
        if not found:
            break
        time.sleep(0.05)
    return killed


@dataclass(frozen=True)
class ExecOutput:
    exit_code: int
    stdout: bytes
    stderr: bytes
    truncated: bool  # stdout or stderr passed the cap: the command was stopped there
    timed_out: bool  # it ran past the timeout and was stopped


def run_capped(argv: list[str], stdin: bytes, cap: int, timeout: float) -> ExecOutput:
    """Run `argv` with `stdin` fed whole; keep at most `cap` bytes of each output stream. A
    stream that passes the cap, or a run past `timeout` s, stops the command (SIGKILL)."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: stopping it stops its children too
    )

    def stop() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    over = threading.Event()
    kept: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}

    def read(stream: IO[bytes], into: bytearray) -> None:
        while chunk := stream.read1(_CHUNK):  # type: ignore[attr-defined]
            room = cap - len(into)
            into += chunk[:room]
            if len(chunk) > room:
                over.set()
                stop()  # stop reading: what is past the cap is not kept anywhere
                return

    def feed() -> None:
        try:
            assert proc.stdin is not None
            proc.stdin.write(stdin)
            proc.stdin.close()
        except (BrokenPipeError, OSError):  # the command ended without reading it all
            pass

    assert proc.stdout is not None and proc.stderr is not None
    threads = [
        threading.Thread(target=feed, daemon=True),
        threading.Thread(target=read, args=(proc.stdout, kept["stdout"]), daemon=True),
        threading.Thread(target=read, args=(proc.stderr, kept["stderr"]), daemon=True),
    ]
    for thread in threads:
        thread.start()
    timed_out = False
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        stop()
        proc.wait()
    for thread in threads[1:]:
        thread.join(5)  # the pipes close with the process group
    proc.stdout.close()
    proc.stderr.close()
    code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode  # as a shell says
    return ExecOutput(code, bytes(kept["stdout"]), bytes(kept["stderr"]), over.is_set(), timed_out)
