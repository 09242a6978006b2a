"""The control plane's check-ins and shutdown parking (appliance/control/liveness.py) against a
stand-in SandboxManager: only running, unheld agents are checked in; a runtime's restart, fail
closed and recovery are audited once each; the interval follows the shortest fail-closed window;
parking runs in parallel within its deadline and reports what it could not park."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from appliance.control.liveness import (
    SHUTDOWN_REASON,
    Liveness,
    checkin_interval,
    park_all,
)


@dataclass
class Record:
    state: str


class Boxes:
    def __init__(self) -> None:
        self.records: dict[str, Record] = {}
        self.hold: str | None = None

    def get(self, name: str) -> Record | None:
        return self.records.get(name)

    def held(self) -> str | None:
        return self.hold


class FakeManager:
    def __init__(self) -> None:
        self.boxes = Boxes()
        self.checkins: list[str] = []
        self.runtime: dict[str, dict[str, Any]] = {}
        self.audits: list[tuple[str, dict[str, Any]]] = []
        self.parked: list[tuple[str, str, float]] = []
        self.park_s = 0.0
        self.park_fails: set[str] = set()
        self._lock = threading.Lock()

    def checkin(self, name: str) -> None:
        self.checkins.append(name)

    def runtime_state(self, name: str) -> dict[str, Any] | None:
        return self.runtime.get(name)

    def store_audit(self, event: str, **fields: Any) -> None:
        with self._lock:
            self.audits.append((event, fields))

    def park(self, name: str, reason: str) -> None:
        time.sleep(self.park_s if name != "slow" else 5)
        if name in self.park_fails:
            raise RuntimeError("podman said no")
        with self._lock:
            self.parked.append((name, reason, time.monotonic()))

    def events(self, name: str) -> list[dict[str, Any]]:
        return [f for e, f in self.audits if e == name]


def blueprint(fail_closed_after: int = 120) -> Any:
    return SimpleNamespace(lifecycle=SimpleNamespace(fail_closed_after=fail_closed_after))


class Deployed:
    def __init__(self, agents: dict[str, Any]) -> None:
        self.agents = agents

    def current(self) -> dict[str, Any]:
        return dict(self.agents)


def rig(*names: str, state: str = "running") -> tuple[FakeManager, Deployed, Any]:
    manager = FakeManager()
    for name in names:
        manager.boxes.records[name] = Record(state)

    @contextmanager
    def opened() -> Iterator[FakeManager]:
        yield manager

    return manager, Deployed({n: blueprint() for n in names}), opened


def test_running_unheld_agents_are_checked_in() -> None:
    manager, deployed, opened = rig("a1", "a2", "a3")
    manager.boxes.records["a2"].state = "stopped"
    del manager.boxes.records["a3"]  # removed meanwhile
    liveness = Liveness(deployed, opened)  # type: ignore[arg-type]
    liveness.tick()
    assert manager.checkins == ["a1"]
    manager.boxes.hold = "drill"  # the kill switch holds: no check-in, the sandboxes fail closed
    liveness.tick()
    assert manager.checkins == ["a1"]


def test_an_agent_whose_blueprint_is_gone_is_still_checked_in() -> None:
    manager, deployed, opened = rig("a1")
    deployed.agents["a1"] = None  # its catalog file edited in place: the agent still runs
    assert Liveness(deployed, opened).tick() == 5.0  # type: ignore[arg-type]
    assert manager.checkins == ["a1"]


def test_runtime_changes_are_audited_once_each() -> None:
    manager, deployed, opened = rig("a1")
    liveness = Liveness(deployed, opened)  # type: ignore[arg-type]
    manager.runtime["a1"] = {"state": "running", "restarts": 0, "pid": 7, "starts": 1}
    liveness.tick()
    assert manager.audits == []  # the first look is the baseline
    exit_ = {"code": None, "signal": 9, "uptime_s": 12.3, "reason": "killed by signal 9"}
    manager.runtime["a1"] = {"state": "backoff", "restarts": 1, "last_exit": exit_}
    liveness.tick()
    liveness.tick()
    [restarted] = manager.events("agent.runtime.restarted")
    assert restarted["agent"] == "a1" and restarted["restarts"] == 1
    assert restarted["last_exit"] == exit_ and restarted["actor"] == "control-plane"
    assert restarted["actor_kind"] == "system"
    assert manager.events("agent.runtime.running") == []
    manager.runtime["a1"] = {"state": "running", "restarts": 1, "pid": 9, "starts": 2}
    liveness.tick()
    liveness.tick()
    [running] = manager.events("agent.runtime.running")
    assert running["pid"] == 9
    manager.runtime["a1"] = {
        "state": "fail_closed",
        "restarts": 1,
        "reason": "control plane silent for 21 s (fail_closed_after=20): runtime stopped",
        "fail_closed_after": 20,
    }
    liveness.tick()
    liveness.tick()
    [closed] = manager.events("agent.runtime.fail_closed")
    assert closed["fail_closed_after"] == 20 and "silent" in closed["reason"]
    manager.runtime["a1"] = {"state": "running", "restarts": 1, "pid": 11, "starts": 3}
    liveness.tick()
    assert len(manager.events("agent.runtime.running")) == 2
    assert len(manager.events("agent.runtime.restarted")) == 1


def test_a_runtime_found_failed_closed_at_start_is_audited() -> None:
    manager, deployed, opened = rig("a1")
    manager.runtime["a1"] = {"state": "fail_closed", "restarts": 0, "reason": "silent"}
    liveness = Liveness(deployed, opened)  # type: ignore[arg-type]
    liveness.tick()
    assert len(manager.events("agent.runtime.fail_closed")) == 1
    manager.runtime["a1"] = {"state": "running", "restarts": 0}
    liveness.tick()
    assert len(manager.events("agent.runtime.running")) == 1


def test_the_interval_follows_the_shortest_fail_closed_window() -> None:
    assert checkin_interval([]) == 5.0
    assert checkin_interval([blueprint(120)]) == 5.0
    assert checkin_interval([blueprint(120), blueprint(12)]) == 3.0
    assert checkin_interval([blueprint(0)]) == 5.0  # off: no window to keep
    assert checkin_interval([blueprint(10), blueprint(0)]) == 2.5
    _manager, deployed, opened = rig("a1")
    deployed.agents["a1"] = blueprint(20)
    assert Liveness(deployed, opened).tick() == 5.0  # type: ignore[arg-type]
    deployed.agents["a1"] = blueprint(12)
    assert Liveness(deployed, opened).tick() == 3.0  # type: ignore[arg-type]


def test_park_all_parks_running_agents_in_parallel() -> None:
    names = [f"a{n}" for n in range(6)]
    manager, deployed, opened = rig(*names)
    manager.boxes.records["a5"].state = "stopped"  # not running: left alone
    manager.park_s = 0.5
    started = time.monotonic()
    out = park_all(deployed, opened)  # type: ignore[arg-type]
    took = time.monotonic() - started
    assert out == {"parked": names[:5], "failed": [], "unfinished": []}
    assert took < 1.5, took  # five half-second parks at once, not one after another
    assert {(n, r) for n, r, _ in manager.parked} == {(n, SHUTDOWN_REASON) for n in names[:5]}
    [audit] = manager.events("control.shutdown")
    assert audit["parked"] == names[:5] and audit["actor"] == "control-plane"


def test_park_all_reports_failures_and_stops_waiting_at_its_deadline() -> None:
    manager, deployed, opened = rig("a1", "bad", "slow")
    manager.park_fails.add("bad")
    started = time.monotonic()
    out = park_all(deployed, opened, deadline_s=1.0)  # type: ignore[arg-type]
    assert time.monotonic() - started < 2.0
    assert out["parked"] == ["a1"] and out["unfinished"] == ["slow"]
    assert out["failed"] == ["bad: podman said no"]
    assert park_all(Deployed({}), opened) == {"parked": [], "failed": [], "unfinished": []}  # type: ignore[arg-type]
