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
