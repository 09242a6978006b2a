"""The console's actions, over the control plane's real app: approvals (approve once, approve and
persist, deny; a 409 or 404 shown on the page) and the kill switch (kill one, kill all with hold,
release, each only from its confirmation page). A viewer sees no action and is refused (403); a
POST without the session's CSRF token, or with a wrong one, is refused (403) and does nothing;
what is done is done as the operator (Principal kind "console") and audited with their name."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.console_fixtures import (
    Console,
    FakeApprovals,
    FakeKillSwitch,
    csrf_of,
    opened_console,
    report,
)


@pytest.fixture
def console(tmp_path: Path) -> Iterator[Console]:
    yield from opened_console(tmp_path)


def _pending(approval_id: str = "ab12", **extra: object) -> dict[str, object]:
    now = time.time()
    entry = {"id": approval_id, "sandbox": "box", "host": "api.example.com", "port": 443,
             "method": "GET", "path": "/v1/things", "created": now - 75, "expires": now + 125,
             "age_s": 75.0}  # fmt: skip
    return {**entry, **extra}


@pytest.fixture
def approvals(console: Console) -> FakeApprovals:
    fake = FakeApprovals([_pending()])
    console.plane.__dict__["approvals"] = fake
    return fake


@pytest.fixture
def kill_switch(console: Console) -> FakeKillSwitch:
    fake = FakeKillSwitch()
    console.plane.__dict__["kill_switch"] = fake
    return fake


def test_a_pending_request_shows_what_the_operator_decides_on(
    console: Console, approvals: FakeApprovals
) -> None:
    page = console.logged_in("ops-1").get("/approvals").text
    row = page[page.index('id="a-ab12"') :]
    row = row[: row.index("</tr>")]
    for text in ["box", "api.example.com", "443", "GET", "/v1/things", "1 min 15 s", "2 min"]:
        assert text in row, text
    assert 'data-refresh="/fragments/approvals/pending" data-every="1000"' in page
    assert approvals.threads and "MainThread" not in approvals.threads  # off the event loop


def test_time_left_is_a_dash_when_the_proxy_gives_no_expiry(
    console: Console, approvals: FakeApprovals
) -> None:
    approvals.pending = [_pending(expires=None)]
    fragment = console.logged_in("ops-1").get("/fragments/approvals/pending").text
    assert "<td>—</td>" in fragment


def test_approve_once_persist_and_deny_as_the_operator(
    console: Console, approvals: FakeApprovals
) -> None:
    approvals.pending = [_pending("a1"), _pending("a2"), _pending("a3")]
    client = console.logged_in("ops-1")
    csrf = csrf_of(client.get("/approvals").text)
    for path, data in [
        ("/approvals/a1/approve", {"csrf": csrf}),
        ("/approvals/a2/approve", {"csrf": csrf, "persist": "1"}),
        ("/approvals/a3/deny", {"csrf": csrf}),
    ]:
        answer = client.post(path, data=data)
        assert answer.status_code == 303 and answer.headers["location"] == "/approvals"
    decided = [(i, d, p, w.kind, w.name) for i, d, p, w in approvals.decided]
    assert decided == [
        ("a1", "approved", False, "console", "ops-1"),
        ("a2", "approved", True, "console", "ops-1"),
        ("a3", "denied", False, "console", "ops-1"),
    ]
    page = client.get("/approvals").text
    assert "approved and persisted (policy rev 7): box → api.example.com:443" in page
    audited = [r for r in console.audit() if r.get("path", "").startswith("/approvals/")]
    assert {(r["actor"], r["actor_kind"], r["status"]) for r in audited} == {
        ("ops-1", "console", 303)
    }
    assert "Nothing is waiting" in page
    history = client.get("/fragments/approvals/history").text
    assert history.count("<td>approved</td>") == 2 and history.count("<td>denied</td>") == 1


def test_a_decision_taken_already_is_a_message_not_an_error_page(
    console: Console, approvals: FakeApprovals
) -> None:
    client = console.logged_in("ops-1")
    csrf = csrf_of(client.get("/approvals").text)
    client.post("/approvals/ab12/approve", data={"csrf": csrf})
    again = client.post("/approvals/ab12/deny", data={"csrf": csrf})
    assert again.status_code == 303
    page = client.get("/approvals").text
    assert "approval ab12 was already decided" in page and "flash-error" in page
    client.post("/approvals/gone/deny", data={"csrf": csrf})
    assert "no pending approval &#39;gone&#39;" in client.get("/approvals").text
    assert len(approvals.decided) == 1


def test_a_viewer_sees_no_action_and_is_refused(
    console: Console, approvals: FakeApprovals, kill_switch: FakeKillSwitch
) -> None:
    client = console.logged_in("watcher", role="viewer")
    page = client.get("/approvals").text
    assert 'id="a-ab12"' in page
    assert "Approve once" not in page and "/approve" not in page and "/deny" not in page
    kill_page = client.get("/kill").text
    assert "/kill/confirm" not in kill_page and "Kill all" not in kill_page
    csrf = csrf_of(page)
    for path, data in [
        ("/approvals/ab12/approve", {"csrf": csrf}),
        ("/approvals/ab12/deny", {"csrf": csrf}),
        ("/kill", {"csrf": csrf, "action": "all", "confirmed": "yes", "hold": "1"}),
        ("/release", {"csrf": csrf, "confirmed": "yes"}),
    ]:
        answer = client.post(path, data=data)
        assert answer.status_code == 403, path
        assert "watcher is a viewer; this needs operator" in answer.text
    assert client.get("/kill/confirm?action=all&hold=1").status_code == 403
    assert approvals.decided == [] and kill_switch.calls == []
    refusals = [r for r in console.audit() if r.get("status") == 403]
    assert len(refusals) == 5 and {r["actor"] for r in refusals} == {"watcher"}


@pytest.mark.parametrize("csrf", [None, "", "wrong", "x" * 10_000])
def test_a_post_without_the_right_csrf_token_does_nothing(
    console: Console, approvals: FakeApprovals, kill_switch: FakeKillSwitch, csrf: str | None
) -> None:
    client = console.logged_in("ops-1")
    extra = {} if csrf is None else {"csrf": csrf}
    for path, data in [
        ("/approvals/ab12/approve", {}),
        ("/kill", {"action": "all", "confirmed": "yes", "hold": "1"}),
        ("/release", {"confirmed": "yes"}),
    ]:
        answer = client.post(path, data={**data, **extra})
        assert answer.status_code == 403, path
        assert "CSRF" in answer.text
    assert approvals.decided == [] and kill_switch.calls == []


def test_an_anonymous_post_is_refused(
    console: Console, approvals: FakeApprovals, kill_switch: FakeKillSwitch
) -> None:
    client = console.client()
    assert client.post("/approvals/ab12/approve", data={"csrf": "x"}).status_code == 401
    assert client.post("/kill", data={"action": "all", "confirmed": "yes"}).status_code == 401
    assert approvals.decided == [] and kill_switch.calls == []


def test_kill_one_goes_through_its_confirmation_page(
    console: Console, kill_switch: FakeKillSwitch
) -> None:
    boxes = [{"name": "agent-1", "state": "running"}, {"name": "box-2", "state": "running"}]
    console.plane.status = lambda: report(  # type: ignore[method-assign]
        sandboxes={"count": 2, "sandboxes": boxes, "held": None}
    )
    client = console.logged_in("ops-1")
    page = client.get("/kill").text
    assert '<option value="agent-1">' in page and 'action="/kill/confirm"' in page
    confirm = client.get("/kill/confirm", params={"action": "one", "name": "agent-1"})
    assert confirm.status_code == 200 and "Kill agent-1?" in confirm.text
    assert kill_switch.calls == []  # the confirmation page acts on nothing
    form = confirm.text[confirm.text.index('action="/kill"') :]
    assert 'name="confirmed" value="yes"' in form and csrf_of(confirm.text) in form
    done = client.post(
        "/kill",
        data={"csrf": csrf_of(confirm.text), "confirmed": "yes", "action": "one",
              "name": "agent-1", "hold": "", "reason": "runaway"},
    )  # fmt: skip
    assert done.status_code == 303 and done.headers["location"] == "/kill"
    [(verb, who, names, all_, hold, reason)] = kill_switch.calls
    assert (verb, who.kind, who.name, names, all_, hold, reason) == (
        "kill", "console", "ops-1", ["agent-1"], False, False, "runaway"
    )  # fmt: skip
    assert "Stopped: agent-1." in client.get("/kill").text


def test_kill_all_with_hold_then_release(console: Console, kill_switch: FakeKillSwitch) -> None:
    client = console.logged_in("ops-1")
    confirm = client.get("/kill/confirm", params={"action": "all", "hold": "1"}).text
    assert "Kill every sandbox and hold?" in confirm
    csrf = csrf_of(confirm)
    post = {"csrf": csrf, "confirmed": "yes", "action": "all", "hold": "1", "reason": "r"}
    assert client.post("/kill", data=post).status_code == 303
    console.plane.status = lambda: report(  # type: ignore[method-assign]
        sandboxes={"count": 0, "sandboxes": [], "held": "r"}
    )
    page = client.get("/kill").text
    assert "Held: r." in page and "New sandboxes are held until released." in page
    release = client.get("/kill/confirm", params={"action": "release"}).text
    assert 'action="/release"' in release
    assert client.post("/release", data={"csrf": csrf, "confirmed": "yes"}).status_code == 303
    assert [c[0] for c in kill_switch.calls] == ["kill", "release"]
    assert kill_switch.calls[0][3:5] == (True, True)
    kills = [r for r in console.audit() if r.get("path") in ("/kill", "/release")]
    assert [(r["actor"], r["actor_kind"]) for r in kills] == [("ops-1", "console")] * 2


def test_the_kill_switch_acts_only_from_its_confirmation_page(
    console: Console, kill_switch: FakeKillSwitch
) -> None:
    client = console.logged_in("ops-1")
    csrf = csrf_of(client.get("/kill").text)
    answer = client.post("/kill", data={"csrf": csrf, "action": "all", "hold": "1"})
    assert answer.status_code == 400 and "confirmation page" in answer.text
    assert client.post("/release", data={"csrf": csrf}).status_code == 400
    assert kill_switch.calls == []
