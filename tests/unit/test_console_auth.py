"""The console's login, sessions and their hostile cases, over the control plane's real app:
anonymous pages go to the login page; a token logs in (a new session id every time, the cookie
HttpOnly and SameSite=Strict); a bad, over-long or brute-forced token does not (and is audited
without the token); a forged or planted cookie is no session; a revoked operator is logged out at
the next request; logout needs the CSRF token; /api/v1 takes the session (X-CSRF-Token for
what may change something) and still takes a bearer token."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from appliance.console import auth, sessions
from appliance.console.sessions import COOKIE, SessionStore
from appliance.control.operators import Operator
from tests.console_fixtures import (
    SETUP,
    Console,
    FakeKillSwitch,
    csrf_of,
    opened_console,
    post_login,
    session_cookie,
)

PAGES = ["/", "/approvals", "/kill", "/fragments/overview", "/fragments/approvals/pending"]


@pytest.fixture
def console(tmp_path: Path) -> Iterator[Console]:
    yield from opened_console(tmp_path)


@pytest.mark.parametrize("path", PAGES)
def test_an_anonymous_page_goes_to_the_login_page(console: Console, path: str) -> None:
    answer = console.client().get(path)
    assert answer.status_code == 303
    page = path in ("/", "/approvals", "/kill")
    assert answer.headers["location"] == (
        f"/login?next={path}" if page and path != "/" else "/login"
    )


def test_a_token_logs_in_and_the_cookie_is_http_only_and_strict(console: Console) -> None:
    token = console.operator("ops-1", "operator")
    client = console.client()
    page = client.get("/login")
    assert page.status_code == 200 and 'name="token"' in page.text
    answer = post_login(client, data={"token": token, "next": "/approvals"})
    assert answer.status_code == 303 and answer.headers["location"] == "/approvals"
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    flags = {f.strip().lower() for f in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/"} <= flags
    assert "secure" not in flags  # plain http on loopback: a Secure cookie would never come back
    home = client.get("/")
    assert home.status_code == 200
    assert "ops-1" in home.text and "operator" in home.text
    assert token not in home.text


def test_over_https_the_cookie_is_secure(console: Console) -> None:
    token = console.operator("ops-1", "operator")
    answer = post_login(console.client("https://127.0.0.1:8070"), data={"token": token})
    assert "secure" in answer.headers["set-cookie"].lower()
    assert answer.headers["strict-transport-security"].startswith("max-age=")


def test_after_login_it_goes_only_to_a_path_on_this_site(console: Console) -> None:
    token = console.operator("ops-1", "operator")
    for target in ["//evil.example/x", "https://evil.example/", "/\\evil.example"]:
        answer = post_login(console.client(), data={"token": token, "next": target})
        assert answer.headers["location"] == "/"


@pytest.mark.parametrize(
    "token",
    ["", "not-a-token", "apt_" + "x" * 43, "apt_" + "a" * 100_000, "<script>alert(1)</script>"],
    ids=["empty", "garbage", "unknown", "over-long", "markup"],
)
def test_a_bad_token_is_refused_and_audited_without_the_token(console: Console, token: str) -> None:
    answer = post_login(console.client(), data={"token": token})
    assert answer.status_code == 401
    assert COOKIE not in answer.headers.get("set-cookie", "")
    assert "unknown or revoked operator token" in answer.text
    assert "<script>alert(1)" not in answer.text
    refused = [r for r in console.audit() if r.get("path") == "/login"]
    assert [(r["method"], r["status"], r["actor"]) for r in refused] == [("POST", 401, "anonymous")]
    if token:
        assert token not in json.dumps(console.audit())


def test_failed_logins_are_limited_per_client(console: Console) -> None:
    token = console.operator("ops-1", "operator")
    client = console.client()
    for _ in range(auth.FAILURES_ALLOWED):
        assert post_login(client, data={"token": "apt_wrong"}).status_code == 401
    blocked = post_login(client, data={"token": token})  # the right one: not even looked at
    assert blocked.status_code == 429
    assert "too many failed logins" in blocked.text
    assert COOKIE not in blocked.headers.get("set-cookie", "")


def test_the_limiter_forgets_failures_after_its_window() -> None:
    now = [0.0]
    limiter = auth.LoginLimiter(allowed=2, window_s=60, clock=lambda: now[0])
    limiter.failed("10.0.0.1")
    limiter.failed("10.0.0.1")
    assert limiter.blocked("10.0.0.1") and not limiter.blocked("10.0.0.2")
    now[0] = 61.0
    assert not limiter.blocked("10.0.0.1")


def _set_cookie(answer: httpx.Response) -> str:
    name, _, rest = answer.headers["set-cookie"].partition("=")
    assert name == COOKIE
    return rest.split(";")[0]


def test_each_login_makes_a_new_session_id_and_a_planted_one_is_never_used(
    console: Console,
) -> None:
    token = console.operator("ops-1", "operator")
    planted = {"Cookie": f"{COOKIE}=planted-by-an-attacker"}
    first = _set_cookie(post_login(console.client(), data={"token": token}, headers=planted))
    assert first != "planted-by-an-attacker"
    relogin = {"Cookie": f"{COOKIE}={first}"}
    second = _set_cookie(post_login(console.client(), data={"token": token}, headers=relogin))
    assert second != first
    client = console.client()
    assert client.get("/", headers={"Cookie": f"{COOKIE}={first}"}).status_code == 303
    assert client.get("/", headers={"Cookie": f"{COOKIE}={second}"}).status_code == 200
    assert client.get("/", headers=planted).status_code == 303


@pytest.mark.parametrize("value", ["forged", "x" * 5000, "A" * 43, "../../etc/passwd"])
def test_a_forged_cookie_is_no_session(console: Console, value: str) -> None:
    client = console.client()
    forged = {"Cookie": f"{COOKIE}={value}"}
    answer = client.get("/approvals", headers=forged)
    assert answer.headers["location"] == "/login?next=/approvals"
    assert client.get("/api/v1/status", headers=forged).status_code == 401


def test_a_revoked_operator_is_logged_out_at_the_next_request(console: Console) -> None:
    client = console.logged_in("ops-1")
    assert client.get("/").status_code == 200
    console.plane.operators.revoke("ops-1", SETUP.audit_fields())
    assert client.get("/").status_code == 303
    # Re-created under the same name: the old session is still not theirs.
    console.operator("ops-1", "admin")
    assert client.get("/").status_code == 303


def test_logout_needs_the_csrf_token_and_ends_the_session(console: Console) -> None:
    client = console.logged_in("ops-1")
    csrf = csrf_of(client.get("/").text)
    assert client.post("/logout").status_code == 403
    assert client.post("/logout", data={"csrf": "wrong"}).status_code == 403
    assert client.get("/").status_code == 200  # still logged in
    cookie = session_cookie(client)
    answer = client.post("/logout", data={"csrf": csrf})
    assert answer.status_code == 303 and answer.headers["location"] == "/login"
    replay = console.client()
    assert replay.get("/", headers={"Cookie": f"{COOKIE}={cookie}"}).status_code == 303


def test_the_api_takes_the_session_with_its_csrf_header(console: Console) -> None:
    kill_switch = FakeKillSwitch()
    console.plane.__dict__["kill_switch"] = kill_switch
    client = console.logged_in("ops-1")
    csrf = csrf_of(client.get("/").text)
    assert client.get("/api/v1/status").status_code == 200
    refused = client.post("/api/v1/release")
    assert refused.status_code == 403
    assert refused.json()["error"]["type"] == "forbidden"
    assert client.post("/api/v1/release", headers={"X-CSRF-Token": "wrong"}).status_code == 403
    assert kill_switch.calls == []
    done = client.post("/api/v1/release", headers={"X-CSRF-Token": csrf})
    assert done.status_code == 200
    [(verb, who)] = kill_switch.calls
    assert (verb, who.kind, who.name, who.role) == ("release", "console", "ops-1", "operator")


def test_the_api_refuses_a_viewer_session_what_a_viewer_token_may_not(console: Console) -> None:
    client = console.logged_in("watcher", role="viewer")
    csrf = csrf_of(client.get("/").text)
    assert client.get("/api/v1/status").status_code == 200
    answer = client.post("/api/v1/release", headers={"X-CSRF-Token": csrf})
    assert answer.status_code == 403


def test_a_bearer_token_still_works_without_a_session(console: Console) -> None:
    token = console.operator("ops-1", "operator")
    client = console.client()
    assert client.get("/api/v1/status").status_code == 401
    answer = client.get("/api/v1/status", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200


def test_the_login_is_audited_with_the_operators_name(console: Console) -> None:
    console.logged_in("ops-1")
    [login] = [r for r in console.audit() if r.get("path") == "/login"]
    assert (login["actor"], login["actor_kind"], login["status"]) == ("ops-1", "console", 303)
    assert console.tokens["ops-1"] not in json.dumps(console.audit())


def _operator(name: str = "ops-1") -> Operator:
    return Operator(name=name, role="operator", created_at=1.0)


def test_a_session_ends_when_idle_or_old() -> None:
    now = [0.0]
    store = SessionStore(clock=lambda: now[0])
    idle = store.create(_operator())
    busy = store.create(_operator())
    for minute in range(1, 8 * 60, 10):  # a request every 10 minutes for 8 hours
        now[0] = minute * 60.0
        assert store.get(busy.id) is busy
    assert store.get(idle.id) is None  # 30 minutes without a request
    now[0] = sessions.ABSOLUTE_S + 1
    assert store.get(busy.id) is None  # 8 hours after the login, busy or not
    assert len(store) == 0


def test_the_store_drops_the_least_recently_seen_when_full(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sessions, "MAX_SESSIONS", 3)
    now = [0.0]
    store = SessionStore(clock=lambda: now[0])
    made = []
    for i in range(3):
        now[0] = float(i)
        made.append(store.create(_operator()))
    now[0] = 10.0
    store.get(made[0].id)  # seen again: the least recently seen is now made[1]
    store.create(_operator())
    assert store.get(made[1].id) is None
    assert store.get(made[0].id) is made[0] and store.get(made[2].id) is made[2]


def test_a_login_without_the_login_pages_csrf_token_is_refused(console: Console) -> None:
    """Login CSRF: another site posting its own operator token into the victim's browser."""
    token = console.operator("ops-1", "operator")
    client = console.client()
    page = client.get("/login")
    field = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert field and client.cookies[auth.LOGIN_CSRF_COOKIE] == field.group(1)
    cookie = page.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/login" in cookie
    assert f"max-age={auth.LOGIN_CSRF_S}" in cookie
    wrong = "x" * len(field.group(1))
    for cookies, data in [
        ({}, {"token": token}),  # no Origin either: a missing Origin is no pass
        ({}, {"token": token, "csrf": field.group(1)}),  # the field without its cookie
        ({auth.LOGIN_CSRF_COOKIE: field.group(1)}, {"token": token}),  # the cookie alone
        ({auth.LOGIN_CSRF_COOKIE: field.group(1)}, {"token": token, "csrf": wrong}),
        ({auth.LOGIN_CSRF_COOKIE: ""}, {"token": token, "csrf": ""}),
    ]:
        other = console.client()
        other.cookies.update(cookies)
        answer = other.post("/login", data=data)
        assert answer.status_code == 403 and "log in again" in answer.text, data
        assert COOKIE not in other.cookies
        assert 'name="csrf" value="' in answer.text  # a fresh form to try again with
    assert not console.app.state.console.logins.blocked("testclient")
    assert post_login(console.client(), data={"token": token}).status_code == 303
