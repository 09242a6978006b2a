"""The privileged monitor's side of the privsep link (appliance/egress_main.py): what an
unprivileged (possibly compromised) proxy may and may not make it write."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from appliance.egress_main import Monitor
from sandbox.policy import Endpoint, Policy, load_policy
from sandbox.proxy import MemoryAudit


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


def test_a_persisted_approval_is_one_host_and_port_only(tmp_path: Path) -> None:
    monitor, _, policy = _monitor(tmp_path)
    wire = _Wire()
    wider = {"host": "api.example.com", "ports": [443], "allow_private": True, "access": "full"}
    asyncio.run(monitor._handle({"persist": 1, "endpoint": wider}, wire))  # type: ignore[arg-type]
    assert wire.sent == [{"reply": 1, "error": None}]
    assert load_policy(policy).network.allow == [Endpoint(host="api.example.com", ports=[443])]
    many = {"host": "b.example.com", "ports": [80, 443]}
    asyncio.run(monitor._handle({"persist": 2, "endpoint": many}, wire))  # type: ignore[arg-type]
    assert wire.sent[-1]["reply"] == 2 and "one port" in wire.sent[-1]["error"]
    assert len(load_policy(policy).network.allow) == 1


@pytest.mark.parametrize(
    "endpoint",
    [
        {"host": "*.com", "ports": [443]},  # a wildcard: every .com host
        {"host": "*.example.com", "ports": [443]},
        {"host": "10.0.0.1", "ports": [443]},  # private, loopback, link-local literals
        {"host": "127.0.0.1", "ports": [80]},
        {"host": "169.254.169.254", "ports": [80]},
        {"host": "192.168.1.10", "ports": [443]},
        {"host": "127.1", "ports": [80]},  # numeric shorthands the resolver reads as addresses
        {"host": "2130706433", "ports": [80]},
        {"host": "api.example.com", "ports": []},
        {"host": "api.example.com", "ports": [443], "paths": ["/**"], "extra": 1},
        {"host": "", "ports": [443]},
        "api.example.com:443",
        None,
    ],
)
def test_a_proxy_cannot_make_the_monitor_persist_a_wide_rule(tmp_path: Path, endpoint: Any) -> None:
    """The proxy is unprivileged and may be compromised: one concrete public host, one port."""
    monitor, _, policy = _monitor(tmp_path)
    wire = _Wire()
    asyncio.run(monitor._handle({"persist": 9, "endpoint": endpoint}, wire))  # type: ignore[arg-type]
    assert wire.sent[-1]["reply"] == 9 and wire.sent[-1]["error"], wire.sent
    assert load_policy(policy).network.allow == []


def test_a_public_host_or_address_is_still_persisted(tmp_path: Path) -> None:
    monitor, _, policy = _monitor(tmp_path)
    wire = _Wire()
    for i, host in enumerate(["pypi.org", "8.8.8.8"]):
        asyncio.run(
            monitor._handle({"persist": i, "endpoint": {"host": host, "ports": [443]}}, wire)  # type: ignore[arg-type]
        )
    assert [m["error"] for m in wire.sent] == [None, None]
    assert [e.host for e in load_policy(policy).network.allow] == ["pypi.org", "8.8.8.8"]


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
