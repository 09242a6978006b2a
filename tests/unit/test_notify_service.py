"""The plane's notify service (appliance/control/notify/service.py) on a real plane (its store,
audit chain and one-tap keys in tmp_path) and a real local receiver."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.config import ApplianceConfig, WebhookConfig
from appliance.control.api.deps import Principal
from appliance.control.notify.events import NotifyEvent, event_for
from appliance.control.notify.formats import render
from appliance.control.notify.service import public_url
from appliance.control.notify.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from appliance.control.plane import ControlPlane
from appliance.errors import NotFoundError
from tests.notify_fixtures import receiver

SECRET = "service-test-secret-value"
ALICE = Principal("token", "alice", "operator")


def make_plane(tmp_path: Path, url: str, **notify: Any) -> ControlPlane:
    config = ApplianceConfig.model_validate(
        {
            "state_dir": tmp_path / "state",
            "control": {"port": 8070},
            "notify": {
                "webhooks": [
                    {
                        "name": "ops",
                        "url": url,
                        "events": ["approval.pending", "agent.killed"],
                        "secret_env": "OPS_SECRET",
                    },
                    {
                        "name": "chat",
                        "url": "https://hooks.slack.com/services/T0/B0/topsecretpath",
                        "events": ["budget.warn"],
                        "format": "slack",
                    },
                ],
                **notify,
            },
        }
    )
    return ControlPlane(config)


@pytest.fixture(autouse=True)
def secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPS_SECRET", SECRET)


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[ControlPlane]:
    p = make_plane(tmp_path, "http://127.0.0.1:9/hook")
    yield p
    p.close()


def pending(expires_at: float) -> NotifyEvent:
    record = {"event": "egress.held", "ts": "2026-12-08T00:00:00Z", "hash": "c" * 64,
              "approval": "ab01", "sandbox": "web", "host": "x.io", "port": 443, "method": "GET",
              "expires": expires_at}  # fmt: skip
    event = event_for(record)
    assert event is not None
    return event


def test_list_shows_no_secret_and_hides_url_paths(plane: ControlPlane) -> None:
    hooks = plane.notify.list()
    assert [h["name"] for h in hooks] == ["ops", "chat"]
    assert hooks[0]["secret_from"] == "env OPS_SECRET" and hooks[0]["signed"] is True
    assert hooks[1]["url"] == "https://hooks.slack.com/…" and hooks[1]["signed"] is False
    assert hooks[0]["last"] is None
    dumped = json.dumps(hooks)
    assert SECRET not in dumped and "topsecretpath" not in dumped


def test_unknown_hook_names_the_configured_ones(plane: ControlPlane) -> None:
    with pytest.raises(NotFoundError, match=r"no webhook named 'nope'; configured: ops, chat"):
        plane.notify.test(ALICE, "nope")


def test_only_subscribed_hooks_get_an_event_and_notify_records_none(plane: ControlPlane) -> None:
    service = plane.notify
    service.on_record({"event": "notify.delivered", "hook": "ops", "hash": "a" * 64})
    service.on_record({"event": "control.kill", "sandboxes": ["a"], "hash": "a" * 64})
    assert service.deliverer.pending() == 0
    service.on_record({"event": "kill", "sandboxes": ["a"], "hash": "b" * 64})
    service.on_record({"event": "budget.warning", "key_name": "k", "hash": "d" * 64})
    assert service.deliverer.pending() == 2  # ops: agent.killed; chat: budget.warn


def test_pending_links_to_the_console_without_one_tap(plane: ControlPlane) -> None:
    hook = plane.notify.hooks["ops"]
    link = plane.notify.link(hook, pending(time.time() + 30))
    assert link == "http://127.0.0.1:8070/approvals#a-ab01"


def test_one_tap_links_carry_a_token_for_that_webhook_until_expiry(tmp_path: Path) -> None:
    p = make_plane(tmp_path, "http://127.0.0.1:9/hook", one_tap=True,
                   console_url="https://phone.example.org/console/")  # fmt: skip
    try:
        expires = time.time() + 30
        link = p.notify.link(p.notify.hooks["ops"], pending(expires))
        assert link is not None and link.startswith("https://phone.example.org/console/one-tap/")
        claim = p.one_tap.verify(link.rsplit("/", 1)[1])
        assert claim.approval_id == "ab01" and claim.webhook == "ops"
        assert abs(claim.expires_at - expires) < 0.01
        late = p.notify.link(p.notify.hooks["ops"], pending(time.time() - 1))
        assert late == "https://phone.example.org/console/approvals#a-ab01"  # no token: too late
    finally:
        p.close()


def test_the_thread_delivers_what_is_appended_to_the_chain(tmp_path: Path) -> None:
    with receiver() as rx:
        p = make_plane(tmp_path, rx.url, one_tap=True)
        stop = threading.Event()
        thread = threading.Thread(target=p.notify.run, args=(stop,))
        thread.start()
        try:
            assert p.notify.follower.started.wait(5)  # it starts at the end
            p.audit_log.append(
                "egress.held", sandbox="web", host="api.example.com", port=443, method="GET",
                approval="ab07", reason="waiting up to 30s for approval", expires=time.time() + 30,
            )  # fmt: skip
            [req] = rx.wait_for(1)
            ts, sig = req.headers[TIMESTAMP_HEADER], req.headers[SIGNATURE_HEADER]
            assert verify(SECRET.encode(), ts, req.body, sig)
            body = json.loads(req.body)
            assert body["event"] == "approval.pending" and body["approval"] == "ab07"
            assert "/one-tap/" in body["link"]
            deadline = time.monotonic() + 5
            while p.notify.deliverer.last("ops") is None and time.monotonic() < deadline:
                time.sleep(0.02)
            last = p.notify.list()[0]["last"]
            assert last["ok"] and last["notification"] == "approval.pending"
        finally:
            stop.set()
            thread.join(5)
            p.close()
    log = p.audit_log.path.read_text()
    assert '"event":"notify.delivered"' in log and SECRET not in log
    assert body["link"].rsplit("/", 1)[1] not in log  # the token is not in the log


def test_test_sends_now_and_returns_the_outcome(tmp_path: Path) -> None:
    with receiver([500]) as rx:
        p = make_plane(tmp_path, rx.url)
        try:
            failed = p.notify.test(ALICE, "ops")
            ok = p.notify.test(ALICE, "ops")
        finally:
            p.close()
        assert len(rx.requests) == 2  # one attempt each: no retry behind the operator's back
    assert failed["ok"] is False and failed["status"] == 500 and failed["attempts"] == 1
    assert ok["ok"] is True and ok["notification"] == "test"
    assert json.loads(rx.requests[1].body)["requested_by"] == "alice"


def test_public_url_never_shows_a_query_fragment_or_userinfo() -> None:
    assert public_url("https://ntfy.example.com?auth=SECRETTOKEN") == "https://ntfy.example.com/…"
    assert public_url("https://ntfy.example.com/?auth=SECRET") == "https://ntfy.example.com/…"
    assert public_url("https://ntfy.example.com#SECRET") == "https://ntfy.example.com/…"
    assert public_url("https://u:SECRET@[::1]:8443/topic") == "https://[::1]:8443/…"
    assert public_url("https://u:SECRET@ntfy.example.com") == "https://ntfy.example.com"
    assert public_url("https://ntfy.example.com/") == "https://ntfy.example.com"


def held(approval: str, digest: int, expires: float) -> dict[str, Any]:
    return {"event": "egress.held", "ts": "2026-12-08T00:00:00Z", "hash": f"{digest:064x}",
            "approval": approval, "sandbox": "web", "host": "x.io", "port": 443,
            "method": "GET", "expires": expires}  # fmt: skip


def test_a_held_approval_is_notified_once_however_many_requests_it_holds(
    plane: ControlPlane,
) -> None:
    service = plane.notify
    expires = time.time() + 30
    for n in range(50):  # a sandbox repeating one held request: one pending entry, 50 records
        service.on_record(held("ab01", n, expires))
    assert service.deliverer.pending() == 1
    service.on_record(held("ab02", 99, expires))
    assert service.deliverer.pending() == 2


def test_notified_approvals_are_remembered_until_expiry_in_bounded_memory() -> None:
    from appliance.control.notify.service import SeenApprovals

    seen = SeenApprovals(limit=3)
    now = 1000.0
    assert seen.first_time("a1", now + 10, now) and not seen.first_time("a1", now + 10, now)
    assert seen.first_time("a1", now + 30, now + 11)  # past its expiry: forgotten
    for n in range(10):
        assert seen.first_time(f"b{n}", now + 20 + n, now + 12)
        assert len(seen) <= 3


def test_a_long_one_tap_link_reaches_ntfy_whole_and_verifies(tmp_path: Path) -> None:
    console = "https://phone.example.org/" + "reverse-proxy-path/" * 8
    p = make_plane(tmp_path, "http://127.0.0.1:9/hook", one_tap=True, console_url=console)
    try:
        hook = WebhookConfig(name="h" * 63, url="https://ntfy.example.com/topic",
                             events=["approval.pending"], format="ntfy")  # fmt: skip
        event = pending(time.time() + 30)
        link = p.notify.link(hook, event)
        assert link is not None and len(link) > 200
        click = render(event, "ntfy", link).headers["Click"]
        assert click == link
        claim = p.one_tap.verify(click.rsplit("/", 1)[1])
        assert claim.approval_id == "ab01" and claim.webhook == "h" * 63
    finally:
        p.close()
