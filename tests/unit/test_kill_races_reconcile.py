"""The kill switch racing a reconciliation never leaves the killed sandbox running.

The kill records the desired state (`stopped`) before it stops containers, and reconcile reads the
record and the hold again just before (and after) it restarts anything. Each test runs the kill at
one point inside a reconcile (the fake Podman's hooks), with the real store, and checks the end
state after a further reconcile: what a control plane's next pass would do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.store import open_store
from appliance.store.sandbox_store import SandboxStore
from sandbox.lifecycle.kill import SandboxKillSwitch
from sandbox.lifecycle.layout import SANDBOX_LABEL
from sandbox.lifecycle.reconcile import SandboxReconciliation

Hook = Callable[[], None]


class _Container:
    def __init__(self, name: str, status: str) -> None:
        self.id = f"id-{name}"
        self.labels = {SANDBOX_LABEL: name}
        self.status = status
        self.on_start: Hook | None = None

    def start(self) -> None:
        if (hook := self.on_start) is not None:
            self.on_start = None
            hook()  # the kill lands while Podman starts it
        self.status = "running"

    def stop(self, timeout: int = 0) -> None:
        self.status = "exited"


class _Manager(SandboxKillSwitch, SandboxReconciliation):
    """The kill and reconcile mixins over the real store and a fake Podman."""

    def __init__(self, boxes: SandboxStore, tmp: Path) -> None:
        self.boxes = boxes
        self.tmp = tmp
        self.containers: dict[str, _Container] = {}
        self.on_list: Hook | None = None
        self.audited: list[str] = []

    def paths(self, name: str) -> Any:
        return self.tmp / name

    def _labelled(self, name: str | None = None) -> list[Any]:
        listed = [c for n, c in self.containers.items() if name in (None, n)]
        snapshot = [_Listed(c) for c in listed]
        if (hook := self.on_list) is not None:
            self.on_list = None
            hook()  # the kill lands between Podman's list and the store's
        return snapshot

    def _start_container(self, name: str, container: Any, record: bool = True) -> dict[str, Any]:
        self.containers[name].start()
        if record:
            self.boxes.set_state(name, "running")
        self.store_audit("sandbox.start")
        return {}

    def _stop_containers(self, ids: list[str]) -> list[str | None]:
        for cid in ids:
            next(c for c in self.containers.values() if c.id == cid).stop()
        return [None] * len(ids)

    def store_audit(self, event: str, **fields: Any) -> None:
        self.audited.append(event)

    def _proxy_running(self, paths: Any) -> int | None:
        return 1

    def _start_proxy(self, name: str, paths: Any) -> None:
        pass

    def _stop_proxy(self, paths: Any) -> None:
        pass


class _Listed:
    """What Podman's list returned: the status then, though the container moves on."""

    def __init__(self, container: _Container) -> None:
        self._container = container
        self.id, self.labels = container.id, container.labels
        self.attrs = {"State": container.status}  # a list result's plain string

    def start(self) -> None:
        self._container.start()

    def stop(self, timeout: int = 0) -> None:
        self._container.stop(timeout)


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[_Manager]:
    with open_store(tmp_path) as store:
        boxes = SandboxStore(store)
        boxes.upsert("demo", image="img", command=["x"], state="running", container_id="id-demo")
        yield _Manager(boxes, tmp_path)


def _assert_killed_stays_down(manager: _Manager) -> None:
    manager.reconcile()  # the next pass
    assert manager.boxes.get("demo").state == "stopped"
    assert manager.containers["demo"].status != "running"


@pytest.mark.parametrize("hold", [False, True])
def test_a_kill_during_the_restart_of_a_stopped_container_wins(
    manager: _Manager, hold: bool
) -> None:
    """The e2e's race: the container stopped (a reboot, a crash), reconcile restarts it, and the
    kill switch lands while Podman starts it."""
    container = manager.containers["demo"] = _Container("demo", "exited")
    container.on_start = lambda: manager.kill(["demo"], hold=hold, reason="hard stop")
    out = manager.reconcile()
    assert "demo" not in out.restarted and "demo" in out.stopped
    assert "sandbox.stop" in manager.audited  # reconcile stopped what it had started
    _assert_killed_stays_down(manager)


def test_a_kill_between_podmans_list_and_the_stores_is_not_undone(manager: _Manager) -> None:
    """Podman listed it running, then the kill stopped it: the record (`stopped`) wins."""
    manager.containers["demo"] = _Container("demo", "running")
    manager.on_list = lambda: manager.kill(["demo"], hold=False, reason="hard stop")
    out = manager.reconcile()
    assert "demo" not in out.running
    _assert_killed_stays_down(manager)


def test_a_reconcile_inside_the_kills_stop_does_not_restart_it(manager: _Manager) -> None:
    """The kill stops the container, and a reconcile runs before the kill returns."""
    manager.containers["demo"] = _Container("demo", "running")
    stop = manager._stop_containers
    results: list[Any] = []

    def stop_then_reconcile(ids: list[str]) -> list[str | None]:
        errors = stop(ids)
        results.append(manager.reconcile())
        return errors

    manager._stop_containers = stop_then_reconcile  # type: ignore[method-assign]
    assert manager.kill(["demo"], hold=False, reason="hard stop") == ["demo"]
    assert "demo" not in results[0].restarted
    _assert_killed_stays_down(manager)


def test_a_sandbox_nobody_killed_is_still_restarted(manager: _Manager) -> None:
    manager.containers["demo"] = _Container("demo", "exited")
    out = manager.reconcile()
    assert out.restarted == ["demo"] and manager.containers["demo"].status == "running"
    assert manager.boxes.get("demo").state == "running"
