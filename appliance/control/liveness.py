"""The control plane's side of fail-closed agents: a thread of the plane, and its shutdown.

Every interval (CHECKIN_EVERY_S, or a quarter of the smallest `lifecycle.fail_closed_after`
among the agents, at least MIN_INTERVAL_S) it checks in every agent whose sandbox should run and
is not held by the kill switch (`SandboxManager.checkin`: the sandbox's supervisor stops the
runtime when check-ins stop), and reads each runtime's state from the supervisor's report,
auditing a change once: `agent.runtime.restarted` (with the last exit), `agent.runtime.fail_closed`,
and `agent.runtime.running` when it runs again after either.

On shutdown (`appliance down`, systemd stop: SIGTERM) the caller stops the scheduler first, then
`park_all` stops every running agent's sandbox (parked: its recorded state stays `running`, so
the next control plane's reconciliation brings it back unless held), by a deadline the caller
takes at the signal (plane.py: the supervisor and systemd's TimeoutStopSec allow 30 s from
SIGTERM to SIGKILL, and the API's graceful stop and the threads' joins come out of the same
budget). What is not parked by then is left to the supervisor's fail-closed rule.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from appliance.control.scheduler import system_principal
from sandbox.lifecycle.runtime import PARK_TIMEOUT_S

if TYPE_CHECKING:
    from appliance.control.schedules import DeployedBlueprints
    from sandbox.lifecycle.manager import SandboxManager

log = logging.getLogger(__name__)

CHECKIN_EVERY_S = 5.0
MIN_INTERVAL_S = 1.0
DEFAULT_FAIL_CLOSED_AFTER_S = 120
# Parking one sandbox at worst: its container's stop (SIGTERM to PID 1, SIGKILL after the park
# timeout, which outlasts PID 1's own stop of the runtime) and its egress proxy's, 2 s.
PARK_NEEDS_S = PARK_TIMEOUT_S + 2.0
PARK_DEADLINE_S = 20.0  # park_all's own, when no caller's deadline is given
# In parallel, not one after another: at PARK_NEEDS_S a sandbox at worst, in sequence only one
# agent would fit in the budget. The parks start in name order and each is audited with its place.
PARK_THREADS = 8
SHUTDOWN_REASON = "control plane shutdown"

OpenManager = Callable[[], AbstractContextManager["SandboxManager"]]


def fail_closed_after(bp: Any) -> int:
    lifecycle = getattr(bp, "lifecycle", None)
    value = getattr(lifecycle, "fail_closed_after", None)
    return DEFAULT_FAIL_CLOSED_AFTER_S if value is None else int(value)


def checkin_interval(blueprints: list[Any]) -> float:
    """Often enough that a quarter of the shortest fail-closed window holds several check-ins."""
    windows = [after / 4 for bp in blueprints if (after := fail_closed_after(bp)) > 0]
    return max(MIN_INTERVAL_S, min([CHECKIN_EVERY_S, *windows]))


class Liveness:
    def __init__(self, deployed: DeployedBlueprints, open_manager: OpenManager) -> None:
        self.deployed = deployed
        self.open_manager = open_manager
        self.who = system_principal("control-plane")
        # Of the agents there now: a removed one's are dropped (a new agent of the same name
        # starts from a fresh baseline, not from its predecessor's restarts and failures).
        self._seen: dict[str, dict[str, Any]] = {}  # each runtime's last section seen
        self._owed_running: set[str] = set()  # restarted or failed closed: say when it runs

    def run(self, stop: threading.Event) -> None:
        """Check in until `stop`; never raises."""
        while True:
            interval = CHECKIN_EVERY_S
            try:
                interval = self.tick()
            except Exception as exc:  # Podman or the store away: try again next round
                log.warning("agent check-in failed: %s", exc)
            if stop.wait(interval):
                return

    def tick(self) -> float:
        """One round; the interval until the next. Every agent is checked in, its blueprint
        resolvable or not (a catalog file edited in place must not stop a running agent)."""
        blueprints = self.deployed.current()
        present: set[str] = set()
        if blueprints:
            with self.open_manager() as manager:
                self._round(manager, sorted(blueprints), present)
        # An agent gone (or its sandbox) is forgotten; a round that failed forgets nothing.
        self._seen = {n: s for n, s in self._seen.items() if n in present}
        self._owed_running &= present
        return checkin_interval([bp for bp in blueprints.values() if bp is not None])

    def _round(self, manager: SandboxManager, names: list[str], present: set[str]) -> None:
        held = manager.boxes.held()
        for name in names:
            record = manager.boxes.get(name)
            if record is None:
                continue
            present.add(name)
            if record.state == "running" and held is None:
                try:
                    manager.checkin(name)
                except Exception as exc:  # one agent's directory must not stop the rest
                    log.warning("check-in of %s failed: %s", name, exc)
            try:
                state = manager.runtime_state(name)
            except Exception as exc:  # a report being rewritten: read next round
                log.debug("runtime state of %s unreadable: %s", name, exc)
                continue
            self._observe(manager, name, state)

    def _observe(self, manager: SandboxManager, name: str, state: dict[str, Any] | None) -> None:
        if not state:
            return
        before = self._seen.get(name)
        self._seen[name] = state
        now, was = state.get("state"), (before or {}).get("state")
        restarts, restarted_before = state.get("restarts") or 0, (before or {}).get("restarts")
        audit = manager.store_audit
        fields = {"agent": name, **self.who.audit_fields()}
        if restarted_before is not None and restarts > restarted_before:
            audit(
                "agent.runtime.restarted",
                **fields,
                restarts=restarts,
                last_exit=state.get("last_exit"),
            )
            self._owed_running.add(name)
        if now == "fail_closed" and was != "fail_closed":
            audit(
                "agent.runtime.fail_closed",
                **fields,
                reason=state.get("reason"),
                fail_closed_after=state.get("fail_closed_after"),
                at=state.get("fail_closed_at"),
            )
            self._owed_running.add(name)
        if now == "running" and name in self._owed_running:
            audit(
                "agent.runtime.running", **fields, pid=state.get("pid"), starts=state.get("starts")
            )
            self._owed_running.discard(name)


def park_all(
    deployed: DeployedBlueprints,
    open_manager: OpenManager,
    deadline: float | None = None,
) -> dict[str, list[str]]:
    """Park every agent whose sandbox runs, PARK_THREADS at a time, started in name order (each
    `sandbox.parked` carries its place in that order); stop waiting at `deadline` (monotonic;
    default PARK_DEADLINE_S from now): what is not parked by then is reported `unfinished` and
    left to the supervisor's fail-closed rule. Daemon threads: a park still under way at the
    deadline does not hold the process's exit. Never raises."""
    started = time.monotonic()
    if deadline is None:
        deadline = started + PARK_DEADLINE_S
    out: dict[str, list[str]] = {"parked": [], "failed": [], "unfinished": []}
    try:
        agents = sorted(deployed.current())
        with open_manager() as manager:
            running = [n for n in agents if (r := manager.boxes.get(n)) and r.state == "running"]
    except Exception as exc:
        log.error("parking agents: cannot list them: %s", exc)
        return out
    if not running:
        return out

    queue = iter(enumerate(running, start=1))
    outcomes: dict[str, str | None] = {}  # name -> None (parked) or the error
    lock = threading.Lock()
    all_done = threading.Event()

    def worker() -> None:
        while True:
            with lock:  # the next name in order
                order, name = next(queue, (0, ""))
            if not name:
                return
            try:
                with open_manager() as manager:  # a connection per thread
                    manager.park(name, reason=SHUTDOWN_REASON, order=order)
                error = None
            except Exception as exc:
                error = str(exc) or type(exc).__name__
            with lock:
                outcomes[name] = error
                if len(outcomes) == len(running):
                    all_done.set()

    for n in range(min(PARK_THREADS, len(running))):
        threading.Thread(target=worker, name=f"park-{n}", daemon=True).start()
    all_done.wait(max(0.0, deadline - time.monotonic()))
    with lock:
        for name in running:
            if name not in outcomes:
                out["unfinished"].append(name)
            elif (error := outcomes[name]) is not None:
                out["failed"].append(f"{name}: {error}")
            else:
                out["parked"].append(name)
    elapsed = round(time.monotonic() - started, 2)
    log.warning("control plane shutdown: agents parked in %.1f s: %s", elapsed, out)
    try:
        with open_manager() as manager:
            manager.store_audit(
                "control.shutdown",
                **out,
                order=running,
                duration_s=elapsed,
                **system_principal("control-plane").audit_fields(),
            )
    except Exception as exc:
        log.error("control plane shutdown: audit failed: %s", exc)
    return out
