"""Audit records -> notification events (pure: no I/O, no config).

The event names themselves are appliance/notify_events.py's (the config checks them too).
Every decision is already a record in the audit chain; a notification is a record an operator
wants pushed. Only the fields listed here leave the host, whatever else a record holds.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from appliance.notify_events import TEST_EVENT
from sandbox.policy import Approval

_APPROVAL = ("approval", "sandbox", "host", "port", "method")
_BUDGET = ("key_name", "key_id", "budget", "used", "limit", "period")

# audit event -> (notification event, the fields it carries)
SOURCES: dict[str, tuple[str, tuple[str, ...]]] = {
    "egress.held": ("approval.pending", _APPROVAL),
    "approval.expired": ("approval.expired", (*_APPROVAL, "waited_s")),
    "budget.warning": ("budget.warn", (*_BUDGET, "percent")),
    "budget.exceeded": ("budget.throttle", (*_BUDGET, "resets_at")),
    "budget.hard_stop": ("budget.stop", (*_BUDGET, "resets_at")),
    # The sandbox lifecycle's own record of every kill (the API's, the budget hard stop's);
    # the API's `control.kill` beside it is the same kill, so it is not sent twice.
    "kill": ("agent.killed", ("sandboxes", "failed", "hold", "reason")),
    "agent.runtime.restarted": ("agent.crashed", ("agent", "restarts", "last_exit")),
    "agent.runtime.fail_closed": ("agent.fail_closed", ("agent", "reason", "fail_closed_after")),
    # A writer that found the log cut or corrupt records this before its own records.
    "audit.anomaly": ("audit.tamper", ("kind", "detail")),
}

# a held request's wait when its record names none: the policy's default hold_seconds
DEFAULT_HOLD_S: float = Approval.model_fields["hold_seconds"].default
_HOLD = re.compile(r"waiting up to ([0-9]+(?:\.[0-9]+)?)s")


@dataclass(frozen=True)
class NotifyEvent:
    name: str  # one of appliance.notify_events.EVENTS, or TEST_EVENT
    ts: str  # ISO-8601 UTC: when it happened (the record's ts)
    id: str  # stable for one record: receivers may dedupe retries on it
    fields: dict[str, Any] = field(default_factory=dict)
    expires_at: float | None = None  # approval.pending: when the held request is denied


def event_for(record: dict[str, Any]) -> NotifyEvent | None:
    """The notification for an audit record, or None (most records, notify.* among them)."""
    source = SOURCES.get(str(record.get("event")))
    if source is None:
        return None
    name, keys = source
    fields = {k: record[k] for k in keys if k in record}
    ts = str(record.get("ts") or now_iso())
    digest = record.get("hash")
    event_id = str(digest)[:32] if isinstance(digest, str) and digest else secrets.token_hex(16)
    expires_at = None
    if name == "approval.pending":
        expires_at = held_until(record, ts)
        fields["expires_at"] = iso(expires_at)
    return NotifyEvent(name, ts, event_id, fields, expires_at)


def held_until(record: dict[str, Any], ts: str) -> float:
    """When a held request is denied: its `expires` when the proxy recorded one (epoch seconds
    or ISO), else the record's time plus the hold its reason names (or the policy default)."""
    expires = record.get("expires", record.get("expires_at"))
    if isinstance(expires, int | float) and not isinstance(expires, bool):
        return float(expires)
    if isinstance(expires, str) and (when := parse_iso(expires)) is not None:
        return when
    start = parse_iso(ts) or datetime.now(UTC).timestamp()
    found = _HOLD.search(str(record.get("reason", "")))
    return start + (float(found.group(1)) if found else DEFAULT_HOLD_S)


def tamper_event(kind: str, detail: str) -> NotifyEvent:
    """What the follower itself saw (a record that does not link, the file cut or replaced)."""
    return NotifyEvent(
        "audit.tamper", now_iso(), secrets.token_hex(16), {"kind": kind, "detail": detail}
    )


def event_for_test(requested_by: str) -> NotifyEvent:
    detail = {"message": "a test notification from the appliance", "requested_by": requested_by}
    return NotifyEvent(TEST_EVENT, now_iso(), secrets.token_hex(16), detail)


def parse_iso(value: str) -> float | None:
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
