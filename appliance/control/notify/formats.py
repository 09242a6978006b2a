"""Bodies and headers per receiver format.

    json   {"event", "ts", "id", <the event's fields>, "link"?}   (signed: signing.py)
    slack  an incoming webhook's {"text": ...} (Slack's mrkdwn, its three characters escaped)
    ntfy   the text as the body; Title, Tags, Priority and Click (the link) as headers

Values in the text come from sandboxes and agents (a host name a sandbox asked for), so each is
cut short and stripped of control characters; header values are ASCII without CR/LF. The link
(ntfy's Click) is never cut (a one-tap token cut short is refused): control characters are
removed and anything else outside printable ASCII is percent-encoded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from appliance.control.notify.events import NotifyEvent
from appliance.notify_events import TEST_EVENT

MAX_VALUE_CHARS = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_URL_SAFE = "!#$%&'()*+,/:;=?@[]~"  # kept as they are in a link; the rest is percent-encoded


@dataclass(frozen=True)
class Rendered:
    body: bytes
    headers: dict[str, str]


def _v(fields: dict[str, Any], key: str) -> str:
    value = fields.get(key)
    if value is None:
        return "?"
    if isinstance(value, list):
        value = ", ".join(str(v) for v in value) or "none"
    text = _CONTROL.sub(" ", str(value))
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "…"


def _killed(f: dict[str, Any]) -> str:
    held = "; all sandboxes held stopped until `appliance release`" if f.get("hold") else ""
    failed = f"; could not stop: {_v(f, 'failed')}" if f.get("failed") else ""
    return f"stopped: {_v(f, 'sandboxes')}{failed}{held} ({_v(f, 'reason')})"


# event -> (title, ntfy tag, text from the fields)
_TEXTS: dict[str, tuple[str, str, Callable[[dict[str, Any]], str]]] = {
    "approval.pending": (
        "Approval pending",
        "hourglass",
        lambda f: (
            f"sandbox {_v(f, 'sandbox')} wants {_v(f, 'host')}:{_v(f, 'port')} "
            f"({_v(f, 'method')}); denied at {_v(f, 'expires_at')} unless approved"
        ),
    ),
    "approval.expired": (
        "Approval expired",
        "no_entry",
        lambda f: (
            f"sandbox {_v(f, 'sandbox')}'s request to {_v(f, 'host')}:{_v(f, 'port')} "
            f"was denied after {_v(f, 'waited_s')}s unanswered"
        ),
    ),
    "budget.warn": (
        "Budget warning",
        "warning",
        lambda f: (
            f"key {_v(f, 'key_name')}: {_v(f, 'budget')} at {_v(f, 'percent')}% "
            f"({_v(f, 'used')} of {_v(f, 'limit')}, {_v(f, 'period')})"
        ),
    ),
    "budget.throttle": (
        "Budget exceeded",
        "money_with_wings",
        lambda f: (
            f"key {_v(f, 'key_name')}: {_v(f, 'budget')} spent ({_v(f, 'used')} of "
            f"{_v(f, 'limit')}); refused until {_v(f, 'resets_at')}"
        ),
    ),
    "budget.stop": (
        "Budget hard stop",
        "stop_sign",
        lambda f: (
            f"key {_v(f, 'key_name')}: monthly {_v(f, 'budget')} spent ({_v(f, 'used')} "
            f"of {_v(f, 'limit')}); stopped until {_v(f, 'resets_at')}"
        ),
    ),
    "agent.killed": ("Kill switch pulled", "skull", _killed),
    "agent.crashed": (
        "Agent restarted",
        "boom",
        lambda f: (
            f"agent {_v(f, 'agent')}'s runtime exited ({_v(f, 'last_exit')}); "
            f"restart {_v(f, 'restarts')}"
        ),
    ),
    "agent.fail_closed": (
        "Agent failed closed",
        "lock",
        lambda f: f"agent {_v(f, 'agent')} stopped itself: {_v(f, 'reason')}",
    ),
    "audit.tamper": (
        "Audit log tampered",
        "rotating_light",
        lambda f: f"{_v(f, 'kind')}: {_v(f, 'detail')}; run `appliance audit verify`",
    ),
    TEST_EVENT: (
        "Test notification",
        "white_check_mark",
        lambda f: f"a test notification from the appliance (requested by {_v(f, 'requested_by')})",
    ),
}
_URGENT = {"approval.pending", "agent.killed", "audit.tamper", "budget.stop"}


def title_and_text(event: NotifyEvent) -> tuple[str, str]:
    title, _tag, text = _TEXTS[event.name]
    return title, text(event.fields)


def json_body(event: NotifyEvent, link: str | None) -> bytes:
    # The event's own keys win: a field can never pass itself off as the event or its id.
    body = {**event.fields, "event": event.name, "ts": event.ts, "id": event.id}
    if link:
        body["link"] = link
    return json.dumps(body, separators=(",", ":")).encode()


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _header(value: str) -> str:
    return _CONTROL.sub(" ", value).encode("ascii", "replace").decode("ascii")[:MAX_VALUE_CHARS]


def _link_header(link: str) -> str:
    return quote(_CONTROL.sub("", link), safe=_URL_SAFE)


def render(event: NotifyEvent, fmt: str, link: str | None = None) -> Rendered:
    if fmt == "json":
        return Rendered(json_body(event, link), {"Content-Type": "application/json"})
    title, text = title_and_text(event)
    if fmt == "slack":
        line = f"*{_slack_escape(title)}*: {_slack_escape(text)}"
        if link:
            line += f" <{link}|open in the console>"
        body = json.dumps({"text": line}, separators=(",", ":")).encode()
        return Rendered(body, {"Content-Type": "application/json"})
    if fmt == "ntfy":
        headers = {
            "Content-Type": "text/plain; charset=utf-8",
            "Title": _header(title),
            "Tags": _TEXTS[event.name][1],
            "Priority": "high" if event.name in _URGENT else "default",
        }
        if link:
            headers["Click"] = _link_header(link)
        return Rendered(text.encode(), headers)
    raise ValueError(f"unknown notification format {fmt!r}")
