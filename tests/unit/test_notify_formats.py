"""Bodies and headers per receiver format (appliance/control/notify/formats.py)."""

from __future__ import annotations

import json

import httpx
import pytest

from appliance.control.notify.events import NotifyEvent
from appliance.control.notify.formats import render
from appliance.notify_events import EVENTS, TEST_EVENT

HOSTILE_HOST = "evil.example\r\nX-Injected: 1 <!channel> & ünï"
PENDING = NotifyEvent(
    "approval.pending",
    "2026-12-08T00:00:00Z",
    "id1",
    {"approval": "ap-1", "sandbox": "web", "host": HOSTILE_HOST, "port": 443, "method": "GET"},
    expires_at=1.0,
)
LINK = "http://127.0.0.1:8070/one-tap/tok"


def test_json_body_is_the_event_its_fields_and_the_link() -> None:
    out = render(PENDING, "json", LINK)
    body = json.loads(out.body)
    assert body == {**PENDING.fields, "event": "approval.pending", "ts": PENDING.ts, "id": "id1",
                    "link": LINK}  # fmt: skip
    assert out.headers["Content-Type"] == "application/json"
    assert "link" not in json.loads(render(PENDING, "json").body)


def test_a_field_cannot_pass_itself_off_as_the_event() -> None:
    event = NotifyEvent("budget.warn", "t", "real-id", {"event": "audit.tamper", "id": "forged"})
    body = json.loads(render(event, "json").body)
    assert body["event"] == "budget.warn" and body["id"] == "real-id"


def test_slack_text_escapes_its_control_characters_and_links() -> None:
    text = json.loads(render(PENDING, "slack", LINK).body)["text"]
    assert "<!channel>" not in text and "&lt;!channel&gt; &amp; ünï" in text
    assert "\r" not in text and "\n" not in text
    assert text.startswith("*Approval pending*: sandbox web wants evil.example")
    assert text.endswith(f"<{LINK}|open in the console>")


def test_ntfy_headers_are_ascii_without_line_breaks() -> None:
    out = render(PENDING, "ntfy", LINK)
    assert out.headers["Title"] == "Approval pending"
    assert out.headers["Click"] == LINK and out.headers["Priority"] == "high"
    assert "evil.example" in out.body.decode()
    # httpx (h11) would refuse CR/LF or non-ASCII in a header: building the request must work
    httpx.Request("POST", "http://x/", headers=out.headers, content=out.body)


@pytest.mark.parametrize("name", [*EVENTS, TEST_EVENT])
@pytest.mark.parametrize("fmt", ["json", "slack", "ntfy"])
def test_every_event_renders_in_every_format_even_with_fields_missing(name: str, fmt: str) -> None:
    out = render(NotifyEvent(name, "t", "i", {}), fmt)
    assert out.body
    if fmt != "json":
        assert "?" in out.body.decode() or name in ("test",)


def test_long_values_are_cut() -> None:
    event = NotifyEvent("agent.crashed", "t", "i", {"agent": "a" * 5000, "last_exit": 1})
    assert len(render(event, "ntfy").body) < 400


def test_unknown_format_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown notification format"):
        render(PENDING, "xml")


def test_the_ntfy_click_link_is_never_cut_and_is_ascii_without_line_breaks() -> None:
    long_link = "https://phone.example.org/" + "c" * 300 + "/one-tap/" + "t" * 200
    assert render(PENDING, "ntfy", long_link).headers["Click"] == long_link
    hostile = "https://phone.example.org/kö/one-tap/ab\r\nX-Injected: 1"
    click = render(PENDING, "ntfy", hostile).headers["Click"]
    assert click == "https://phone.example.org/k%C3%B6/one-tap/abX-Injected:%201"
    httpx.Request("POST", "http://x/", headers={"Click": click})
