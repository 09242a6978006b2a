"""One start of the agent (the sandbox's command): fork, restrict the child with the policy's
Landlock ruleset, let it report what it runs under, then tell it to exec, or not.

Forking after PID 1's forwarder threads exist (every restart of an always-on runtime) is safe
because of what the child does between fork and exec: only syscalls (setsid, sigmask, chdir,
open, the Landlock calls through ctypes, read/write on its pipes, exec) and lock-free pure
Python (json, dataclasses). Python's fork reinitialises its own GIL, import lock and threading
state; glibc's malloc has fork handlers. What another thread may hold at fork time and nobody
releases in the child: sys.stderr's buffer lock (the child logs with log_raw, one os.write), and
the lock of any file object (the cyclic GC could run a finaliser that flushes one: disabled).
"""

from __future__ import annotations

import gc
import json
import os
import signal
from dataclasses import asdict
from typing import Any, NoReturn

import landlock
from log import log, log_raw
from procs import reap
from report import proc_status

SCOPES = ["abstract_unix_socket", "signal"]
FORWARDED = {
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
}
STOPPING = {signal.SIGTERM, signal.SIGINT}


def agent_child(
    cfg: dict[str, Any], abi: int, env: dict[str, str], status_w: int, go_r: int
) -> NoReturn:
    """Runs in the forked child; never returns."""
    try:
        gc.disable()  # see the module docstring
        os.setsid()  # own process group: signals go to the whole agent tree
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, *FORWARDED, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)  # ignored dispositions would survive exec
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        os.chdir(cfg["cwd"])
        # Opened before Landlock so that the policy need not grant /proc; a read at offset 0
        # regenerates the content, so what we send is the state after restriction.
        status_fd = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
        ll = cfg["landlock"]
        outcome = landlock.restrict(abi, ll["fs"], ll["net"], SCOPES)
        msg = {
            "landlock": asdict(outcome),
            "status": proc_status(os.pread(status_fd, 16384, 0)),
            "uid": os.getuid(),
        }
        os.write(status_w, json.dumps(msg).encode() + b"\n")
        os.close(status_w)
        if os.read(go_r, 1) != b"g":
            os._exit(0)  # PID 1 decided not to start the agent
        os.execvpe(cfg["command"][0], cfg["command"], env)
    except BaseException as exc:
        log_raw(f"agent: cannot start {cfg['command'][0]!r}: {exc}")
    os._exit(127)


def enforcement_error(
    agent_ll: dict[str, Any], ll: dict[str, Any], abi: int, why: str = ""
) -> str | None:
    """Why the agent must not start (hard_requirement, not enforced); else None, after a
    warning for whatever best_effort gave up."""
    if ll["compatibility"] == "hard_requirement" and not agent_ll["enforced"]:
        return f"agent: {agent_ll['error']}"
    if not agent_ll["enforced"]:
        log(f"WARNING: Landlock NOT ENFORCED AT ALL (best_effort): {agent_ll['error'] or why}")
    if agent_ll["missing"] or agent_ll["skipped_paths"]:
        log(
            "WARNING: Landlock ({}): kernel ABI {} cannot enforce {}; skipped paths {}".format(
                ll["compatibility"],
                abi,
                agent_ll["missing"] or "-",
                agent_ll["skipped_paths"] or "-",
            )
        )
    return None


def read_line(fd: int) -> bytes:
    buf = b""
    while not buf.endswith(b"\n") and (chunk := os.read(fd, 65536)):
        buf += chunk
    return buf


class Launch:
    """A forked agent, restricted, waiting for `go()` or `cancel()`. `report` is what it said
    about itself (None: it died before reporting; its status is then `exit_status`).
    Raises OSError when the fork itself fails (EAGAIN: the sandbox's pids limit)."""

    def __init__(self, cfg: dict[str, Any], abi: int, env: dict[str, str]) -> None:
        status_r, status_w = os.pipe()
        go_r, go_w = os.pipe()
        try:
            self.pid = os.fork()
        except OSError:
            for fd in (status_r, status_w, go_r, go_w):
                os.close(fd)
            raise
        if self.pid == 0:
            os.close(status_r)
            os.close(go_w)
            agent_child(cfg, abi, env, status_w, go_r)
        os.close(status_w)
        os.close(go_r)
        self._go_w: int | None = go_w
        self.exit_status: int | None = None
        try:
            self.report: dict[str, Any] | None = json.loads(read_line(status_r) or b"null")
        except ValueError:
            self.report = None
        finally:
            os.close(status_r)
        if not self.report:
            self.cancel()

    def go(self) -> None:
        assert self._go_w is not None
        os.write(self._go_w, b"g")
        os.close(self._go_w)
        self._go_w = None

    def cancel(self) -> None:
        """EOF on its pipe: the child exits without exec; wait for it."""
        if self._go_w is not None:
            os.close(self._go_w)
            self._go_w = None
        while (status := reap(self.pid)) is None:
            signal.sigtimedwait({signal.SIGCHLD}, 0.05)
        self.exit_status = status
