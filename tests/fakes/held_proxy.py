"""A sandbox proxy's admin socket as the control plane's approval service sees it (the HTTP API
over a unix socket is the boundary replaced): pending entries, settled once, thread-safe."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from appliance.control import approvals


class HeldProxy:
    def __init__(self) -> None:
        self.pending: list[dict[str, Any]] = []
        self.decided: list[tuple[str, str, str]] = []  # (id, decision, reason)
        self._lock = threading.Lock()

    def hold(
        self, approval_id: str, host: str = "example.com", port: int = 443, hold_s: float = 30.0
    ) -> dict[str, Any]:
        now = time.time()
        entry = {
            "id": approval_id,
            "sandbox": "box",
            "host": host,
            "port": port,
            "created": now,
            "expires": now + hold_s,
            "method": "GET",
            "path": "/a",
            "waiters": 1,
        }
        with self._lock:
            self.pending.append(entry)
        return entry

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(p) for p in self.pending]

    def approve(self, approval_id: str, persist: bool = False) -> dict[str, Any]:
        return self._settle(approval_id, "approved", "approved by operator")

    def deny(self, approval_id: str, reason: str | None = None) -> dict[str, Any]:
        return self._settle(approval_id, "denied", reason or "denied by operator")

    def _settle(self, approval_id: str, decision: str, reason: str) -> dict[str, Any]:
        with self._lock:
            found = [p for p in self.pending if p["id"] == approval_id]
            if not found:
                raise KeyError(approval_id)
            self.pending.remove(found[0])
            self.decided.append((approval_id, decision, reason))
            return found[0]


def use_proxy(monkeypatch: pytest.MonkeyPatch, proxy: object, sandbox: str = "box") -> None:
    """Every approval service lists and decides through `proxy` as sandbox `sandbox`'s."""

    @contextmanager
    def clients(_m: object) -> Iterator[dict[str, object]]:
        yield {sandbox: proxy}

    monkeypatch.setattr(approvals, "admin_clients", clients)
