"""An always-on runtime: PID 1's main loop when sandbox.json has `runtime` or `checkin`.

PID 1 keeps the runtime (the sandbox's command) up: an exit is recorded, its process group and
any orphans are stopped, and with `restart: always` it starts again after a backoff (initial,
doubling to the maximum; back to the initial once a run lasted `healthy_after_s`). With
`checkin`, the runtime runs only while the control plane's check-in file is fresh: PID 1 stats it
every second, stops the runtime when it is older than `after_s` (or missing) and starts it again
when it is fresh. PID 1 itself exits only on SIGTERM/SIGINT (container stop), or when Landlock
cannot be enforced on a start under hard_requirement (exit 3, as before: never retried).
Every state change rewrites the report's `runtime` section.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from log import EXIT_LANDLOCK, log
from procs import reap, stop_group, stop_the_rest
from report import agent_fields, utc, write_report
from spawn import FORWARDED, STOPPING, Launch, enforcement_error

POLL_S = 0.5
CHECKIN_EVERY_S = 1.0


def describe(status: int) -> tuple[int | None, int | None, str]:
    """(exit code, signal, words) of a wait status."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return None, sig, f"killed by signal {sig} ({signal.Signals(sig).name})"
    code = os.waitstatus_to_exitcode(status)
    return code, None, f"exited with code {code}"


class Runtime:
    """The runtime's state machine: waiting, running, backoff, fail_closed, stopped, failed."""

    def __init__(
        self,
        cfg: dict[str, Any],
        abi: int,
        env: dict[str, str],
        report: dict[str, Any],
        tick: Callable[[], None] = lambda: None,
    ) -> None:
        self.cfg, self.abi, self.env, self.report = cfg, abi, env, report
        self.tick = tick  # called on every turn of the loop (init.py: refusals into the report)
        rt = cfg["runtime"] or {"restart": "never"}
        self.always = rt["restart"] == "always"
        self.initial = float(rt.get("backoff_initial_s", 1))
        self.max_delay = float(rt.get("backoff_max_s", 60))
        self.healthy_after = float(rt.get("healthy_after_s", 60))
        self.delay = self.initial
        self.checkin: dict[str, Any] | None = cfg["checkin"]
        self.after_s = self.checkin["after_s"] if self.checkin else 0
        self.state, self.reason = "waiting", ""
        self.pid: int | None = None
        self.started_mono, self.started_at = 0.0, 0.0
        self.starts = self.restarts = 0
        self.last_exit: dict[str, Any] | None = None
        self.next_start = 0.0  # monotonic, while in backoff
        self.fail_closed_at: float | None = None

    # -- the report ------------------------------------------------------------------------------

    def section(self) -> dict[str, Any]:
        backoff = self.state == "backoff"
        return {
            "state": self.state,
            "pid": self.pid,
            "starts": self.starts,
            "restarts": self.restarts,
            "started_at": utc(self.started_at) if self.starts else None,
            "last_exit": self.last_exit,
            "next_start_at": (
                utc(time.time() + max(0.0, self.next_start - time.monotonic())) if backoff else None
            ),
            "fail_closed_after": self.after_s,
            "fail_closed_at": utc(self.fail_closed_at) if self.fail_closed_at else None,
            "reason": self.reason,
            "updated_at": utc(),
        }

    def set_state(self, state: str, reason: str = "") -> None:
        self.state, self.reason = state, reason
        self.report["runtime"] = self.section()
        write_report(self.cfg["report_path"], self.report)

    def refuse(self, reason: str) -> int:
        """Landlock cannot be enforced as required: never started, never retried (exit 3)."""
        self.report["landlock"]["error"] = reason
        self.set_state("failed", reason)
        log(f"agent NOT started (Landlock {self.cfg['landlock']['compatibility']}): {reason}")
        return EXIT_LANDLOCK

    # -- the loop --------------------------------------------------------------------------------

    def run(self, first: Launch) -> int:
        """`first` was forked and checked while PID 1 was single-threaded; go, or wait."""
        age = self._checkin_age()
        if self._stale(age):
            first.cancel()
            self.set_state("waiting", "no fresh check-in from the control plane yet")
            log(f"runtime waiting for the control plane's check-in ({self._silence(age)})")
        else:
            self._go(first)
        next_check = time.monotonic() + CHECKIN_EVERY_S
        while True:
            timeout = POLL_S
            if self.state == "backoff":
                timeout = min(timeout, max(0.01, self.next_start - time.monotonic()))
            info = signal.sigtimedwait({*FORWARDED, signal.SIGCHLD}, timeout)
            self.tick()
            if info is not None and info.si_signo in STOPPING:
                return self._shutdown(info.si_signo)
            if info is not None and info.si_signo in FORWARDED and self.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, info.si_signo)
            status = reap(self.pid if self.pid is not None else -1)
            if status is not None and (code := self._exited(status)) is not None:
                return code
            now = time.monotonic()
            if self.checkin and now >= next_check:
                next_check = now + CHECKIN_EVERY_S
                if (code := self._check_in()) is not None:
                    return code
            due = self.state == "backoff" and now >= self.next_start
            if due and (code := self._start()) is not None:
                return code

    # -- check-ins -------------------------------------------------------------------------------

    def _checkin_age(self) -> float | None:
        if not self.checkin:
            return 0.0
        try:
            return time.time() - os.stat(self.checkin["path"]).st_mtime
        except OSError:
            return None

    def _stale(self, age: float | None) -> bool:
        return bool(self.checkin) and (age is None or age > self.after_s)

    def _silence(self, age: float | None) -> str:
        assert self.checkin is not None
        if age is None:
            return f"no check-in file {self.checkin['path']}"
        return f"last check-in {age:.0f} s ago"

    def _check_in(self) -> int | None:
        age = self._checkin_age()
        stale = self._stale(age)
        if stale and self.state in ("running", "backoff"):
            silent = f" for {age:.0f} s" if age is not None else ": no check-in file"
            why = f"control plane silent{silent} (fail_closed_after={self.after_s:g})"
            self._stop(signal.SIGTERM, "fail closed")
            self.fail_closed_at = time.time()
            self.set_state("fail_closed", why)
            log(f"{why}: runtime stopped")
        elif not stale and self.state in ("waiting", "fail_closed"):
            log(f"control plane checked in ({self._silence(age)}): starting the runtime")
            self.delay = self.initial
            return self._start()
        return None

    # -- starts and exits ------------------------------------------------------------------------

    def _start(self) -> int | None:
        """Fork, check, go (same check as the first start); an exit code if PID 1 must exit."""
        try:
            launch = Launch(self.cfg, self.abi, self.env)
        except OSError as exc:
            self.started_mono = time.monotonic()
            return self._exited(None, f"cannot fork: {exc}")
        if launch.report is None:
            self.started_mono = time.monotonic()
            return self._exited(launch.exit_status, "died before reporting")
        self.report.update(agent_fields(launch.report))
        error = enforcement_error(launch.report["landlock"], self.cfg["landlock"], self.abi)
        if error:
            launch.cancel()
            return self.refuse(error)
        self._go(launch)
        return None

    def _go(self, launch: Launch) -> None:
        if self.state == "backoff":
            self.restarts += 1
        launch.go()
        self.pid, self.starts = launch.pid, self.starts + 1
        self.started_mono, self.started_at = time.monotonic(), time.time()
        self.report["agent_started"] = True
        self.set_state("running")
        log(f"runtime started (pid {self.pid}, start {self.starts})")

    def _record(self, status: int | None, why: str) -> tuple[str, float]:
        uptime = round(time.monotonic() - self.started_mono, 3)
        code, sig, words = describe(status) if status is not None else (None, None, why)
        reason = f"{why}: {words}" if status is not None and why else words
        self.last_exit = {
            "code": code,
            "signal": sig,
            "at": utc(),
            "uptime_s": uptime,
            "reason": reason,
        }
        return reason, uptime

    def _exited(self, status: int | None, why: str = "") -> int | None:
        """The runtime ended on its own (or never got going): clean up, then back off or exit."""
        reason, uptime = self._record(status, why)
        if self.pid is not None:
            stop_group(self.pid, signal.SIGTERM, float(self.cfg["stop_grace_s"]))
            self.pid = None
        stop_the_rest(float(self.cfg["exit_grace_s"]))  # orphans: a restart starts clean
        if not self.always:
            self.set_state("stopped", f"runtime {reason}")
            log(f"runtime {reason} after {uptime:g} s (restart: never): supervisor exits")
            code = os.waitstatus_to_exitcode(status) if status is not None else 127
            return 128 - code if code < 0 else code  # killed by signal N → 128+N
        if uptime >= self.healthy_after:
            self.delay = self.initial
        delay, self.delay = self.delay, min(self.delay * 2, self.max_delay)
        self.next_start = time.monotonic() + delay
        self.set_state("backoff", f"runtime {reason} after {uptime:g} s: restart in {delay:g} s")
        log(self.reason)
        return None

    def _stop(self, sig: int, why: str) -> None:
        """Stop a running runtime (`sig` to its group, SIGKILL after stop_grace_s) and orphans."""
        if self.pid is not None:
            status = stop_group(self.pid, sig, float(self.cfg["stop_grace_s"]))
            self._record(status, f"stopped ({why})")
            self.pid = None
        stop_the_rest(float(self.cfg["exit_grace_s"]))

    def _shutdown(self, sig: int) -> int:
        name = signal.Signals(sig).name
        self._stop(sig, f"supervisor stopping on {name}")
        self.set_state("stopped", f"supervisor stopping on {name}")
        log(f"runtime stopped: supervisor stopping on {name}")
        return 0
