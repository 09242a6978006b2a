"""The control plane's sandbox gate: per-name operations run together, reconciliation alone
(never beside a create in flight), and a thread inside may nest without deadlocking. And a
sandbox created or started while the kill switch was pulled with --hold is stopped at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest

from appliance.control.api.deps import Principal
from appliance.control.sandboxes import SandboxService, _Gate
from appliance.errors import ConflictError


def test_reconciliation_waits_for_operations_in_flight_and_blocks_new_ones() -> None:
    gate = _Gate()
    events: list[str] = []
    inside, release = threading.Event(), threading.Event()

    def create() -> None:
        with gate.shared():
            inside.set()
            release.wait(5)
            events.append("create done")

    def reconcile() -> None:
        with gate.exclusive():
            events.append("reconcile")
            time.sleep(0.1)
            events.append("reconcile done")

    def later() -> None:
        with gate.shared():
            events.append("later")

    first = threading.Thread(target=create)
    first.start()
    assert inside.wait(5)
    rec = threading.Thread(target=reconcile)
    rec.start()
    time.sleep(0.1)
    nxt = threading.Thread(target=later)
    nxt.start()
    time.sleep(0.1)
    assert events == []  # the reconciler waits for the create; the newcomer for the reconciler
    release.set()
    for t in (first, rec, nxt):
        t.join(5)
    assert events == ["create done", "reconcile", "reconcile done", "later"]


def test_two_shared_holders_run_together() -> None:
    gate = _Gate()
    both = threading.Barrier(2, timeout=5)

    def hold() -> None:
        with gate.shared():
            both.wait()  # raises BrokenBarrierError if the second never got in

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert not both.broken


def test_a_thread_inside_may_nest_while_a_reconciler_waits() -> None:
    gate = _Gate()
    waiting = threading.Event()
    nested_done = threading.Event()

    def reconcile() -> None:
        waiting.set()
        with gate.exclusive():
            pass

    with gate.shared():
        rec = threading.Thread(target=reconcile)
        rec.start()
        assert waiting.wait(5)
        time.sleep(0.1)  # the reconciler now waits, and holds newcomers back
        with gate.shared():  # ...but not this thread, which it waits for
            nested_done.set()
    rec.join(5)
    assert nested_done.is_set() and not rec.is_alive()


class _Boxes:
    def __init__(self, held: str | None) -> None:
        self._held = held

    def get(self, name: str) -> None:
        return None

    def held(self) -> str | None:
        return self._held


class _Manager:
    """The SandboxManager calls the service makes, recorded (the real one needs Podman)."""

    def __init__(self, held: str | None) -> None:
        self.boxes = _Boxes(held)
        self.calls: list[tuple] = []

    def create(self, name: str, policy: object, command: object, image: object) -> object:
        self.calls.append(("create", name))
        return SimpleNamespace(name=name, state="running")

    def start(self, name: str) -> None:
        self.calls.append(("start", name))

    def kill(self, names: list[str], hold: bool, reason: str) -> list[str]:
        self.calls.append(("kill", names, hold))
        return names

    def enforcement(self, name: str) -> dict:
        return {}

    def store_audit(self, event: str, **fields: object) -> None:
        self.calls.append(("audit", event))


def _service(manager: _Manager, tmp_path: Path) -> SandboxService:
    class Service(SandboxService):
        @contextmanager
        def manager(self, ready: bool = True) -> Iterator[_Manager]:  # type: ignore[override]
            yield manager

        def get(self, name: str) -> dict:
            return {"name": name}

    plane = SimpleNamespace(
        config=SimpleNamespace(state_dir=tmp_path), locked=lambda kind, name: nullcontext()
    )
    return Service(plane)  # type: ignore[arg-type]


WHO = Principal("unix", "uid:0", "admin", uid=0, pid=1)


@pytest.mark.parametrize("held", [None, "operator kill switch"])
def test_a_create_the_kill_switch_held_meanwhile_is_stopped(tmp_path: Path, held: str | None):
    manager = _Manager(held)
    service = _service(manager, tmp_path)
    if held is None:
        assert service.create(WHO, "demo", "version: 1\n", "p.yaml", None, None)["state"]
        assert ("kill", ["demo"], False) not in manager.calls
        return
    with pytest.raises(ConflictError, match="stopped as it started: the kill switch holds"):
        service.create(WHO, "demo", "version: 1\n", "p.yaml", None, None)
    assert manager.calls[0] == ("create", "demo") and ("kill", ["demo"], False) in manager.calls


def test_a_start_the_kill_switch_held_meanwhile_is_stopped(tmp_path: Path) -> None:
    manager = _Manager("operator kill switch")
    with pytest.raises(ConflictError, match="the kill switch holds"):
        _service(manager, tmp_path).start(WHO, "demo")
    assert manager.calls[:2] == [("start", "demo"), ("kill", ["demo"], False)]


def test_a_create_the_kill_switch_broke_is_a_conflict(tmp_path: Path) -> None:
    """Pulled with --hold mid-create, the switch stops the container under the create, which
    fails and undoes itself: the caller gets the hold's 409, with what failed, not a 400."""
    manager = _Manager("operator kill switch")

    def broken(*_a: object) -> object:
        raise RuntimeError("container state improper")

    manager.create = broken  # type: ignore[method-assign]
    with pytest.raises(ConflictError, match="not made: the kill switch held") as info:
        _service(manager, tmp_path).create(WHO, "demo", "version: 1\n", "p.yaml", None, None)
    assert "container state improper" in str(info.value)
    not_held = _Manager(None)
    not_held.create = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="container state improper"):  # its own error
        _service(not_held, tmp_path).create(WHO, "demo", "version: 1\n", "p.yaml", None, None)
