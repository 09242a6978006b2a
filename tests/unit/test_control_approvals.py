"""An approval with --persist writes its rule before the proxy lets the request through: when the
rule cannot be written, nothing is let through (the request stays pending, unaudited approvals
are impossible) and the caller gets the error; a retry may still decide it. The proxy's admin
socket is the boundary replaced here (an HTTP API over a unix socket)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from appliance.config import load_config
from appliance.control import approvals
from appliance.control.api.deps import Principal
from appliance.control.approvals import ApprovalService
from appliance.control.plane import ControlPlane
from appliance.errors import ConflictError, NotFoundError
from appliance.store.approval_store import ApprovalDecisions

WHO = Principal("unix", "uid:0", "admin", uid=0, pid=1)
PENDING = {"id": "abc123", "host": "example.com", "port": 443}


class _Proxy:
    def __init__(self) -> None:
        self.approved: list[str] = []

    def list(self) -> list[dict[str, Any]]:
        return [] if self.approved else [dict(PENDING)]

    def approve(self, approval_id: str) -> None:
        self.approved.append(approval_id)


class _Manager:
    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.audit: list[str] = []

    @staticmethod
    def persistable(approval_id: str, host: object, port: object) -> tuple[object, object]:
        return (host, port)

    def persist_approval(self, name: str, endpoint: object, approval_id: str) -> int:
        if self.fail:
            raise OSError("disk full")
        return 7

    def store_audit(self, event: str, **fields: object) -> None:
        self.audit.append(event)


def _service(
    manager: _Manager, proxy: _Proxy, monkeypatch: pytest.MonkeyPatch, state_dir: Path
) -> ApprovalService:
    @contextmanager
    def one_manager(*_a: object, **_k: object) -> Iterator[_Manager]:
        yield manager

    @contextmanager
    def clients(_m: object) -> Iterator[dict[str, _Proxy]]:
        yield {"box": proxy}

    monkeypatch.setattr(approvals, "admin_clients", clients)
    sandboxes = SimpleNamespace(manager=one_manager, guarded=one_manager)
    plane = SimpleNamespace(
        config=SimpleNamespace(state_dir=state_dir),
        sandboxes=sandboxes,
        locked=lambda kind, name: nullcontext(),
    )
    return ApprovalService(plane)  # type: ignore[arg-type]


def test_a_rule_that_cannot_be_written_lets_nothing_through(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    manager, proxy = _Manager(fail=True), _Proxy()
    service = _service(manager, proxy, monkeypatch, tmp_path)
    with pytest.raises(OSError, match="disk full"):
        service.approve(WHO, "abc123", persist=True)
    assert proxy.approved == [] and manager.audit == []  # still pending, nothing let through
    manager.fail = False  # the disk has room again: the same request can still be decided
    decided = service.approve(WHO, "abc123", persist=True)
    assert decided["persisted"] and decided["rev"] == 7 and proxy.approved == ["abc123"]
    assert manager.audit == ["control.approval.approved"]
    service.close()


class _Held:
    """A proxy holding one request (its admin socket is the boundary replaced): gone once
    decided, as the real broker forgets a decided request."""

    def __init__(self) -> None:
        self.pending = [dict(PENDING)]
        self.decided: list[tuple[str, str]] = []

    def list(self) -> list[dict[str, Any]]:
        return list(self.pending)

    def approve(self, approval_id: str) -> None:
        self._settle(approval_id, "approved")

    def deny(self, approval_id: str) -> None:
        self._settle(approval_id, "denied")

    def _settle(self, approval_id: str, decision: str) -> None:
        if not any(p["id"] == approval_id for p in self.pending):
            raise KeyError(approval_id)
        self.pending = [p for p in self.pending if p["id"] != approval_id]
        self.decided.append((approval_id, decision))


DECISIONS = {"approve": "approved", "deny": "denied"}


def _decide(service: ApprovalService, verb: str, approval_id: str) -> dict[str, Any]:
    if verb == "approve":
        return service.approve(WHO, approval_id, persist=False)
    return service.deny(WHO, approval_id)


@pytest.mark.parametrize("first", list(DECISIONS))
def test_a_decision_is_a_conflict_also_after_a_restart(
    first: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = _Held()  # the proxy outlives the control plane (its own process)

    @contextmanager
    def clients(_m: object) -> Iterator[dict[str, _Held]]:
        yield {"box": proxy}

    monkeypatch.setattr(approvals, "admin_clients", clients)
    config = load_config({"state_dir": str(tmp_path / "state")})
    plane = ControlPlane(config)
    try:
        decided = _decide(plane.approvals, first, "abc123")
        assert decided["decision"] == DECISIONS[first] and proxy.pending == []
    finally:
        plane.close()

    again = ControlPlane(config)  # a restart: a new process on the same state dir
    try:
        for retry in DECISIONS:
            with pytest.raises(ConflictError) as conflict:
                _decide(again.approvals, retry, "abc123")
            message = str(conflict.value)
            assert f"already {decided['decision']}" in message and "box" in message, message
            assert "example.com:443" in message and "by uid:0" in message and conflict.value.hint
        with pytest.raises(NotFoundError):  # never decided: still unknown, not a conflict
            again.approvals.approve(WHO, "def456", persist=False)
    finally:
        again.close()
    assert proxy.decided == [("abc123", decided["decision"])]  # decided once, never again


def test_only_the_newest_decisions_are_kept(tmp_path: Path) -> None:
    decisions = ApprovalDecisions(tmp_path, kept=2)
    try:
        for n in range(3):
            decided = {"id": f"a{n}", "sandbox": "box", "host": "h", "port": 443}
            decisions.record({**decided, "decision": "denied"}, "ops")
        assert decisions.get("a0") is None  # the oldest forgotten: the table stays small
        assert [decisions.get(f"a{n}")["actor"] for n in (1, 2)] == ["ops", "ops"]
    finally:
        decisions.close()
