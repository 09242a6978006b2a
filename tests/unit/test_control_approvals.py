"""An approval with --persist writes its rule before the proxy lets the request through: when the
rule cannot be written, nothing is let through (the request stays pending, unaudited approvals
are impossible) and the caller gets the error; a retry may still decide it. The proxy's admin
socket is the boundary replaced here (an HTTP API over a unix socket)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace
from typing import Any

import pytest

from appliance.control import approvals
from appliance.control.api.deps import Principal
from appliance.control.approvals import ApprovalService

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


def _service(manager: _Manager, proxy: _Proxy, monkeypatch: pytest.MonkeyPatch) -> ApprovalService:
    @contextmanager
    def one_manager(*_a: object, **_k: object) -> Iterator[_Manager]:
        yield manager

    @contextmanager
    def clients(_m: object) -> Iterator[dict[str, _Proxy]]:
        yield {"box": proxy}

    monkeypatch.setattr(approvals, "admin_clients", clients)
    sandboxes = SimpleNamespace(manager=one_manager, guarded=one_manager)
    plane = SimpleNamespace(sandboxes=sandboxes, locked=lambda kind, name: nullcontext())
    return ApprovalService(plane)  # type: ignore[arg-type]


def test_a_rule_that_cannot_be_written_lets_nothing_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    manager, proxy = _Manager(fail=True), _Proxy()
    service = _service(manager, proxy, monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        service.approve(WHO, "abc123", persist=True)
    assert proxy.approved == [] and manager.audit == []  # still pending, nothing let through
    manager.fail = False  # the disk has room again: the same request can still be decided
    decided = service.approve(WHO, "abc123", persist=True)
    assert decided["persisted"] and decided["rev"] == 7 and proxy.approved == ["abc123"]
    assert manager.audit == ["control.approval.approved"]
