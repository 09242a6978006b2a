"""The control plane's check-ins and shutdown parking (appliance/control/liveness.py) against a
stand-in SandboxManager: only running, unheld agents are checked in; a runtime's restart, fail
closed and recovery are audited once each, and a removed agent's history is forgotten; the
interval follows the shortest fail-closed window; parking runs in parallel, started in name order
(each park audited with its place), by its deadline, and reports what it could not park, without
holding the process's exit. The plane's shutdown takes one deadline from the stop signal for the
threads' joins and the parking together."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from appliance.config import load_config
from appliance.control.agent_manager import runtime_service
from appliance.control.liveness import (
    PARK_NEEDS_S,
    SHUTDOWN_REASON,
    Liveness,
    checkin_interval,
    park_all,
)
from appliance.control.plane import SHUTDOWN_BUDGET_S, ControlPlane
from blueprints.model import Blueprint
from blueprints.runtimes import runtime_for
from sandbox.lifecycle.ports import RuntimeService


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
        self.orders: dict[str, int | None] = {}
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

    def park(self, name: str, reason: str, order: int | None = None) -> None:
        with self._lock:
            self.orders[name] = order
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
    out = park_all(deployed, opened, deadline=started + 1.0)  # type: ignore[arg-type]
    assert time.monotonic() - started < 2.0
    assert out["parked"] == ["a1"] and out["unfinished"] == ["slow"]
    assert out["failed"] == ["bad: podman said no"]
    # The park still under way does not hold the process's exit (a pool's worker threads are
    # joined at interpreter exit: the deadline would mean nothing).
    parking = [t for t in threading.enumerate() if t.name.startswith("park")]
    assert parking and all(t.daemon for t in parking), parking
    assert park_all(Deployed({}), opened) == {"parked": [], "failed": [], "unfinished": []}  # type: ignore[arg-type]


def test_parks_start_in_name_order_and_each_is_recorded_with_its_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("appliance.control.liveness.PARK_THREADS", 2)
    names = ["e5", "a1", "d4", "b2", "c3"]
    manager, deployed, opened = rig(*names)
    manager.park_s = 0.2
    out = park_all(deployed, opened)  # type: ignore[arg-type]
    in_order = sorted(names)
    assert out["parked"] == in_order
    assert manager.orders == {name: n for n, name in enumerate(in_order, start=1)}
    [audit] = manager.events("control.shutdown")
    assert audit["order"] == in_order


def test_a_removed_agents_history_is_forgotten() -> None:
    manager, deployed, opened = rig("a1")
    liveness = Liveness(deployed, opened)  # type: ignore[arg-type]
    manager.runtime["a1"] = {"state": "fail_closed", "restarts": 4, "reason": "silent"}
    liveness.tick()
    assert len(manager.events("agent.runtime.fail_closed")) == 1
    del deployed.agents["a1"], manager.boxes.records["a1"]  # `agent rm`
    liveness.tick()
    # A new agent of the same name: its first look is a baseline, not its predecessor's
    # recovery (no `running` owed to it) nor a restart counted from the old one's 4.
    deployed.agents["a1"] = blueprint()
    manager.boxes.records["a1"] = Record("running")
    manager.runtime["a1"] = {"state": "running", "restarts": 0, "pid": 3}
    liveness.tick()
    assert manager.events("agent.runtime.running") == []
    manager.runtime["a1"] = {"state": "running", "restarts": 1, "pid": 4}
    liveness.tick()
    [restarted] = manager.events("agent.runtime.restarted")
    assert restarted["restarts"] == 1
    # A removed agent's sandbox gone while its deployment row lingers: forgotten as well.
    del manager.boxes.records["a1"]
    liveness.tick()
    assert liveness._seen == {} and liveness._owed_running == set()


def test_shutdown_takes_one_deadline_from_the_stop_signal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The joins and the parking share SHUTDOWN_BUDGET_S from the signal: a thread that never
    ends gets what is left before parking's share, not a timeout of its own; parking ends by
    the same deadline."""
    plane = ControlPlane(load_config({"state_dir": str(tmp_path / "state")}))
    parked: list[float] = []
    monkeypatch.setattr(
        "appliance.control.liveness.park_all",
        lambda deployed, opened, deadline: parked.append(deadline),
    )
    monkeypatch.setattr("appliance.control.plane.os.geteuid", lambda: 0)
    stuck = threading.Event()
    plane._threads = [
        threading.Thread(target=stuck.wait, daemon=True, name=f"stuck-{n}") for n in range(3)
    ]
    for thread in plane._threads:
        thread.start()
    try:
        plane.stop_scheduling()  # the signal
        signalled = time.monotonic()
        # The API's graceful stop took what the budget leaves for the joins, less a second.
        plane._stop_signalled_at = signalled - (SHUTDOWN_BUDGET_S - PARK_NEEDS_S - 1.0)
        plane.shutdown()
        took = time.monotonic() - signalled
    finally:
        stuck.set()
    assert took < 2.0, took  # one second for three stuck threads, not 5 s each
    assert parked == [plane._stop_signalled_at + SHUTDOWN_BUDGET_S]
    assert parked[0] - time.monotonic() >= PARK_NEEDS_S - 1.0  # parking keeps its share


def _agent_blueprint(runtime: dict[str, Any], fail_closed_after: int) -> Blueprint:
    return Blueprint.model_validate(
        {
            "name": "bp",
            "version": "1.0.0",
            "runtime": {"kind": "command", **runtime},
            "image": {"name": "localhost/appliance-base", "digest": "sha256:" + "0" * 64},
            "sandbox": {"base": "default"},
            "lifecycle": {"fail_closed_after": fail_closed_after},
        }
    )


@pytest.mark.parametrize(
    ("runtime", "port"),
    [
        ({"command": ["sleep", "infinity"]}, None),  # no service: no socket, no token
        ({"command": ["sleep", "infinity"], "turn": ["echo", "hi"]}, None),  # exec turns
        ({"command": ["python3", "-m", "server"], "serve": {"port": 18790}}, 18790),
    ],
)
def test_every_agents_main_process_is_kept_up_and_fails_closed(
    runtime: dict[str, Any], port: int | None
) -> None:
    bp = _agent_blueprint(runtime, 30)
    service = runtime_service(runtime_for(bp), bp)
    assert (service.port, service.restart, service.fail_closed_after) == (port, True, 30)
    if port is None:
        assert service == RuntimeService(port=None, token_env=None, fail_closed_after=30)
