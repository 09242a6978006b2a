"""Audit records -> notification events (appliance/control/notify/events.py)."""

from __future__ import annotations

import pytest

from appliance.control.notify.events import (
    SOURCES,
    event_for,
    event_for_test,
    held_until,
    parse_iso,
    tamper_event,
)
from appliance.notify_events import EVENTS

TS = "2026-12-08T00:00:00.000000Z"
HASH = "ab" * 32


def rec(event: str, **fields: object) -> dict[str, object]:
    return {"seq": 7, "ts": TS, "event": event, **fields, "prev": "0" * 64, "hash": HASH}


def test_every_source_maps_to_a_known_event_and_every_event_has_a_source() -> None:
    produced = {name for name, _keys in SOURCES.values()}
    assert produced == set(EVENTS)


@pytest.mark.parametrize(
    ("audit_event", "name", "fields"),
    [
        (
            "approval.expired",
            "approval.expired",
            {"approval": "a1", "sandbox": "web", "host": "x.io", "port": 443, "waited_s": 30.1},
        ),
        (
            "budget.warning",
            "budget.warn",
            {"key_name": "k", "key_id": "id", "budget": "daily_tokens", "percent": 80},
        ),
        ("budget.exceeded", "budget.throttle", {"key_name": "k", "resets_at": "2026-12-09"}),
        ("budget.hard_stop", "budget.stop", {"key_name": "k", "used": 5, "limit": 5}),
        ("kill", "agent.killed", {"sandboxes": ["a", "b"], "hold": True, "reason": "r"}),
        ("agent.runtime.restarted", "agent.crashed", {"agent": "bot", "restarts": 2}),
        ("agent.runtime.fail_closed", "agent.fail_closed", {"agent": "bot", "reason": "silent"}),
        ("audit.anomaly", "audit.tamper", {"kind": "truncated", "detail": "cut"}),
    ],
)
def test_mapping(audit_event: str, name: str, fields: dict[str, object]) -> None:
    event = event_for(rec(audit_event, **fields, actor="alice", secret_stuff="x"))
    assert event is not None
    assert event.name == name and event.ts == TS and event.id == HASH[:32]
    assert event.fields == fields  # only the listed fields leave the host


@pytest.mark.parametrize(
    "audit_event",
    ["notify.delivered", "notify.failed", "notify.dropped", "control.kill", "egress.deny", "x"],
)
def test_other_records_are_not_notified(audit_event: str) -> None:
    # notify.* above all: a delivery's own record must never cause another delivery
    assert event_for(rec(audit_event, hook="h")) is None


def test_held_request_carries_its_expiry_from_the_record() -> None:
    event = event_for(
        rec(
            "egress.held",
            sandbox="web",
            host="api.example.com",
            port=443,
            method="GET",
            approval="ap-1",
            reason="waiting up to 30s for approval",
            expires=1_800_000_000.5,
        )
    )
    assert event is not None and event.name == "approval.pending"
    assert event.expires_at == 1_800_000_000.5
    assert event.fields["expires_at"] == "2027-01-15T08:00:00Z"
    assert event.fields["approval"] == "ap-1" and "reason" not in event.fields


def test_held_request_without_expires_uses_the_hold_its_reason_names() -> None:
    start = parse_iso(TS)
    assert start is not None
    assert held_until(rec("egress.held", reason="waiting up to 12.5s for approval"), TS) == (
        start + 12.5
    )
    assert held_until(rec("egress.held"), TS) == start + 30.0  # the policy's default
    assert held_until(rec("egress.held", expires="2026-12-08T00:01:00Z"), TS) == start + 60


@pytest.mark.parametrize("bad", [True, "not a date", None, [1]])
def test_hostile_expires_falls_back(bad: object) -> None:
    start = parse_iso(TS)
    assert start is not None
    assert held_until(rec("egress.held", expires=bad), TS) == start + 30.0


def test_tamper_and_test_events() -> None:
    tamper = tamper_event("chain", "seq 9 does not link")
    assert tamper.name == "audit.tamper" and tamper.fields["kind"] == "chain"
    a, b = event_for_test("alice"), event_for_test("alice")
    assert a.name == "test" and a.fields["requested_by"] == "alice" and a.id != b.id
