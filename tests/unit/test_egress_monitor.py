"""The privileged monitor's side of the privsep link (sandbox/proxy/monitor.py): what an
unprivileged (possibly compromised) proxy may and may not make it write."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from sandbox.policy import Policy, load_policy
from sandbox.proxy import MemoryAudit
from sandbox.proxy.monitor import Monitor


class _Wire:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def write(self, data: bytes) -> None:
        self.sent.append(json.loads(data))


def _monitor(tmp_path: Path) -> tuple[Monitor, MemoryAudit, Path]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(Policy().to_yaml())
    args = argparse.Namespace(sandbox="sb1", policy=policy)
    monitor = Monitor(args, None)
    audit = MemoryAudit()
    monitor.audit = audit  # type: ignore[assignment]
    return monitor, audit, policy


def test_audit_records_are_pinned_to_the_sandbox(tmp_path: Path) -> None:
    monitor, audit, _ = _monitor(tmp_path)
    message = {"audit": "egress.allow", "fields": {"sandbox": "someone-else", "host": "h"}}
    asyncio.run(monitor._handle(message, _Wire()))  # type: ignore[arg-type]
    assert audit.records == [{"event": "egress.allow", "sandbox": "sb1", "host": "h"}]


@pytest.mark.parametrize(
    "message",
    [
        {"audit": "sandbox.create", "fields": {}},  # not the proxy's event to record
        {"audit": "keys.revoke", "fields": {}},
        {"audit": "egress.allow", "fields": ["not", "an", "object"]},
        {"audit": 7, "fields": {}},
        ["not", "an", "object"],
    ],
)
def test_what_is_not_the_proxys_to_record_is_refused(tmp_path: Path, message: Any) -> None:
    monitor, audit, _ = _monitor(tmp_path)
    with pytest.raises(ValueError):
        asyncio.run(monitor._handle(message, _Wire()))  # type: ignore[arg-type]
    assert audit.records == []


@pytest.mark.parametrize(
    "endpoint",
    [
        {"host": "api.example.com", "ports": [443]},  # even a plain one: not on its word
        {"host": "*.com", "ports": [443]},
        {"host": "10.0.0.1", "ports": [443]},
        {"host": "api.example.com", "ports": [443], "allow_private": True, "access": "full"},
        {"host": "b.example.com", "ports": [80, 443]},
        "api.example.com:443",
        None,
    ],
)
def test_the_monitor_persists_nothing_on_the_proxys_word(tmp_path: Path, endpoint: Any) -> None:
    """The proxy is unprivileged and may be compromised, and the admin socket the operator uses
    is served by the proxy: a rule written on its word alone would outlive it. Approvals are
    persisted by the control plane (`appliance approvals approve --persist`), never here."""
    monitor, audit, policy = _monitor(tmp_path)
    before = policy.read_text()
    wire = _Wire()
    asyncio.run(monitor._handle({"persist": 9, "endpoint": endpoint}, wire))  # type: ignore[arg-type]
    assert wire.sent == [{"reply": 9, "error": wire.sent[0]["error"]}]
    assert "control plane" in wire.sent[0]["error"], wire.sent
    assert policy.read_text() == before
    assert load_policy(policy).network.allow == []
    assert [r["event"] for r in audit.records] == ["egress.persist_refused"]
    assert audit.records[0]["sandbox"] == "sb1"


@pytest.mark.parametrize("field", ["event", "sandbox", "self"])
def test_a_record_with_a_reserved_field_name_does_not_stop_the_monitor(
    tmp_path: Path, field: str
) -> None:
    """A field named `event` once collided with _record's own parameter (TypeError, uncaught:
    the monitor exited and the sandbox lost its egress). The record keeps the proxy's field
    under another name; `event` and `sandbox` stay the monitor's."""
    monitor, audit, _ = _monitor(tmp_path)
    message = {"audit": "egress.allow", "fields": {field: "spoofed", "host": "h"}}
    asyncio.run(monitor._handle(message, _Wire()))  # type: ignore[arg-type]
    assert len(audit.records) == 1
    record = audit.records[0]
    assert record["event"] == "egress.allow" and record["sandbox"] == "sb1"
    assert record["host"] == "h"
