"""The plane builds each service once, even when the first requests arrive on many threads at
once (functools.cached_property built one per racing thread: two ApprovalServices would each
remember their own decisions, and one approval could be decided twice)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from appliance.config import load_config
from appliance.control.plane import ControlPlane, service


class _Plane(ControlPlane):
    builds = 0

    @service
    def slow(self) -> object:
        type(self).builds += 1
        time.sleep(0.05)  # wide enough for every thread to arrive while the first builds
        return object()


def test_a_service_is_built_once_under_concurrent_first_use(tmp_path: Path) -> None:
    plane = _Plane(load_config({"state_dir": str(tmp_path / "state")}))
    seen: list[int] = []
    threads = [threading.Thread(target=lambda: seen.append(id(plane.slow))) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    plane.close()
    assert _Plane.builds == 1
    assert len(set(seen)) == 1 and len(seen) == 16


def test_each_plane_has_its_own_services(tmp_path: Path) -> None:
    a = ControlPlane(load_config({"state_dir": str(tmp_path / "a")}))
    b = ControlPlane(load_config({"state_dir": str(tmp_path / "b")}))
    try:
        assert a.approvals is a.approvals and a.approvals is not b.approvals
    finally:
        a.close()
        b.close()


def test_name_locks_are_let_go_when_unused_and_stay_reentrant(tmp_path: Path) -> None:
    plane = ControlPlane(load_config({"state_dir": str(tmp_path / "state")}))
    try:
        for i in range(1000):  # names asked once each (a scan of made-up names)
            with plane.locked("sandbox", f"n{i}"):
                pass
        assert plane._locks == {}
        inside = threading.Event()
        leave = threading.Event()
        order: list[str] = []

        def holder() -> None:
            with plane.locked("sandbox", "x"), plane.locked("sandbox", "x"):  # re-entrant
                inside.set()
                leave.wait(5)
                order.append("first")

        def second() -> None:
            with plane.locked("sandbox", "x"):
                order.append("second")

        first = threading.Thread(target=holder)
        first.start()
        assert inside.wait(5)
        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(0.1)
        assert order == [] and len(plane._locks) == 1  # one lock per name while in use
        leave.set()
        first.join(5)
        waiter.join(5)
        assert order == ["first", "second"] and plane._locks == {}
    finally:
        plane.close()


def test_a_bad_sandbox_name_is_refused_before_any_lock_is_made(tmp_path: Path) -> None:
    import pytest

    from sandbox.names import InvalidNameError

    plane = ControlPlane(load_config({"state_dir": str(tmp_path / "state")}))
    asked: list[tuple[str, str]] = []
    real = plane.locked
    plane.locked = lambda kind, name: asked.append((kind, name)) or real(kind, name)  # type: ignore[method-assign]
    try:
        for name in ("../etc", "Bad Name", "x" * 64):
            with pytest.raises(InvalidNameError), plane.sandboxes.guarded(name):
                pass
        assert asked == [] and plane._locks == {}
    finally:
        plane.close()
