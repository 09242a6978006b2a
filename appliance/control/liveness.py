"""The control plane's side of fail-closed agents: a thread of the plane, and its shutdown.

Every interval (CHECKIN_EVERY_S, or a quarter of the smallest `lifecycle.fail_closed_after`
among the agents, at least MIN_INTERVAL_S) it checks in every agent whose sandbox should run and
is not held by the kill switch (`SandboxManager.checkin`: the sandbox's supervisor stops the
runtime when check-ins stop), and reads each runtime's state from the supervisor's report,
auditing a change once: `agent.runtime.restarted` (with the last exit), `agent.runtime.fail_closed`,
and `agent.runtime.running` when it runs again after either.

On shutdown (`appliance down`, systemd stop: SIGTERM) the caller stops the scheduler first, then
`park_all` stops every running agent's sandbox (parked: its recorded state stays `running`, so
the next control plane's reconciliation brings it back unless held), in parallel, within
PARK_DEADLINE_S: the supervisor (and systemd's TimeoutStopSec) give the control plane 30 s
after SIGTERM before SIGKILL, and the API's own graceful stop takes part of that.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from appliance.control.scheduler import system_principal

if TYPE_CHECKING:
    from appliance.control.schedules import DeployedBlueprints
    from sandbox.lifecycle.manager import SandboxManager

log = logging.getLogger(__name__)

CHECKIN_EVERY_S = 5.0
MIN_INTERVAL_S = 1.0
DEFAULT_FAIL_CLOSED_AFTER_S = 120
PARK_DEADLINE_S = 20.0  # of the 30 s between SIGTERM and SIGKILL
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
        if not blueprints:
            return CHECKIN_EVERY_S
        with self.open_manager() as manager:
            held = manager.boxes.held()
            for name in sorted(blueprints):
                record = manager.boxes.get(name)
                if record is None:
                    continue
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
        return checkin_interval([bp for bp in blueprints.values() if bp is not None])

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
    deadline_s: float = PARK_DEADLINE_S,
) -> dict[str, list[str]]:
    """Park every agent whose sandbox runs, in name order, PARK_THREADS at a time; what is not
    parked within `deadline_s` is left to the supervisor's fail-closed rule. Never raises."""
    started = time.monotonic()
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

    def park(name: str) -> None:
        with open_manager() as manager:  # a connection per thread
            manager.park(name, reason=SHUTDOWN_REASON)

    pool = ThreadPoolExecutor(
        max_workers=min(PARK_THREADS, len(running)), thread_name_prefix="park"
    )
    futures = {pool.submit(park, name): name for name in running}
    done, _ = wait(futures, timeout=max(0.0, deadline_s - (time.monotonic() - started)))
    pool.shutdown(wait=False, cancel_futures=True)
    for future, name in futures.items():
        if future not in done:
            out["unfinished"].append(name)
        elif (exc := future.exception()) is not None:
            out["failed"].append(f"{name}: {exc}")
        else:
            out["parked"].append(name)
    elapsed = round(time.monotonic() - started, 2)
    log.warning("control plane shutdown: agents parked in %.1f s: %s", elapsed, out)
    try:
        with open_manager() as manager:
            manager.store_audit(
                "control.shutdown",
                **out,
                duration_s=elapsed,
                **system_principal("control-plane").audit_fields(),
            )
    except Exception as exc:
        log.error("control plane shutdown: audit failed: %s", exc)
    return out
