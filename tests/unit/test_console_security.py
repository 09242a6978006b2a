"""The console's browser-facing defences, over the control plane's real app: the security headers
on pages, fragments, assets and the API alike (a CSP that allows no inline script or style), no
template that would need one, the loopback Host check still in front of the console's routes,
and hostile names (a sandbox's host, an agent's name) rendered as text, never as markup."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from appliance.console import security
from appliance.errors import StateError
from tests.console_fixtures import (
    BASE,
    Console,
    FakeApprovals,
    csrf_of,
    opened_console,
    post_login,
    report,
)

TEMPLATES = Path(security.__file__).parent / "templates"
XSS = '<script>alert("x")</script>'
IMG = '<img src=x onerror="alert(1)">'


@pytest.fixture
def console(tmp_path: Path) -> Iterator[Console]:
    yield from opened_console(tmp_path)


def test_every_answer_has_the_security_headers(console: Console) -> None:
    client = console.logged_in("ops-1")
    paths = ["/", "/fragments/overview", "/static/console.js", "/api/v1/status"]
    for path in ["/login", *paths]:
        answer = (console.client() if path == "/login" else client).get(path)
        assert answer.status_code == 200, path
        csp = answer.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
        assert "style-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["x-content-type-options"] == "nosniff"
        # not no-referrer: a browser would then post every form with `Origin: null` (refused)
        assert answer.headers["referrer-policy"] == "same-origin"
        if not path.startswith("/static/"):
            assert answer.headers["cache-control"] == "no-store"
    assert "strict-transport-security" not in client.get("/").headers  # plain http


@pytest.mark.parametrize("template", sorted(p.name for p in TEMPLATES.glob("*.html")))
def test_no_template_has_inline_script_or_style(template: str) -> None:
    text = (TEMPLATES / template).read_text()
    for script in re.findall(r"<script\b[^>]*>", text):
        assert "src=" in script, f"{template}: an inline <script>"
    assert "<style" not in text, f"{template}: an inline <style>"
    assert not re.search(r"\sstyle\s*=", text), f"{template}: a style attribute"
    assert not re.search(r"\son[a-z]+\s*=", text), f"{template}: an inline event handler"
    assert "javascript:" not in text.lower()


def test_the_assets_are_served_from_the_package(console: Console) -> None:
    client = console.client()
    js = client.get("/static/console.js")
    assert js.status_code == 200 and "data-refresh" in js.text
    assert js.headers["content-type"].startswith(("text/javascript", "application/javascript"))
    assert client.get("/static/console.css").status_code == 200
    assert client.get("/static/../sessions.py").status_code == 404


@pytest.mark.parametrize("path", ["/", "/login", "/approvals", "/static/console.js"])
def test_a_host_that_is_not_loopback_is_refused_on_console_routes(
    console: Console, path: str
) -> None:
    client = console.logged_in("ops-1")
    answer = client.get(path, headers={"Host": "evil.example:8070"})
    assert answer.status_code == 421
    answer = post_login(client, data={"token": "x"}, headers={"Host": "rebound.example"})
    assert answer.status_code == 421


def test_a_form_posted_from_another_site_is_refused(console: Console) -> None:
    token = console.operator("ops-1", "operator")
    client = console.client()
    answer = post_login(client, data={"token": token}, headers={"Origin": "http://evil.example"})
    assert answer.status_code == 403 and "set-cookie" not in answer.headers
    same = post_login(client, data={"token": token}, headers={"Origin": "http://127.0.0.1:8070"})
    assert same.status_code == 303


def test_hostile_names_are_rendered_as_text(console: Console) -> None:
    pending = {"id": "ab12", "sandbox": IMG, "host": XSS, "port": 443, "method": XSS,
               "path": "/" + XSS, "created": 1.0, "expires": None}  # fmt: skip
    console.plane.__dict__["approvals"] = FakeApprovals([pending])
    agent = {"name": IMG, "blueprint": XSS, "state": "running", "uptime_s": 5}
    hostile = report(
        agents={"count": 1, "agents": [agent], "error": None},
        approvals={"count": 1, "pending": [{**pending, "waiting_s": 3}]},
        sandboxes={"count": 1, "sandboxes": [{"name": IMG, "state": "running"}], "held": XSS},
        host={"host_class": XSS, "product_name": IMG},
    )
    console.plane.status = lambda: hostile  # type: ignore[method-assign]
    client = console.logged_in("ops-1")
    for path in ["/", "/fragments/overview", "/approvals", "/fragments/approvals/pending", "/kill"]:
        page = client.get(path).text
        assert "<script>alert" not in page and "<img src=x" not in page, path
        assert "&lt;script&gt;" in page or "&lt;img" in page, path


def test_a_bad_console_request_is_a_page_and_the_apis_stay_json(console: Console) -> None:
    client = console.logged_in("ops-1")
    csrf = csrf_of(client.get("/").text)
    form = {"csrf": csrf, "action": "<b>everything</b>", "confirmed": "yes"}
    bad = client.post("/kill", data=form)
    assert bad.status_code == 422 and bad.headers["content-type"].startswith("text/html")
    assert "action:" in bad.text and "<b>everything" not in bad.text
    missing = client.get("/no-such-page")
    assert missing.status_code == 404 and "Not found" in missing.text
    assert client.get("/static/nothing.js").status_code == 404
    api = client.get("/api/v1/no-such-thing")
    assert api.status_code == 404 and api.json()["error"]["type"] == "not_found"
    invalid = client.post("/api/v1/kill", json={"names": "x"}, headers={"X-CSRF-Token": csrf})
    assert invalid.status_code == 422 and invalid.json()["error"]["type"] == "invalid_request"


def test_a_form_from_the_consoles_public_url_is_accepted(tmp_path: Path) -> None:
    # Behind the operator's reverse proxy (notify.console_url), which may rewrite Host.
    public = Console(tmp_path / "state", {"notify": {"console_url": "https://ops.example.com/"}})
    try:
        token = public.operator("ops-1", "operator")
        client = public.client()
        for origin, status in [
            ("https://ops.example.com", 303),
            ("http://ops.example.com", 403),
            ("https://ops.example.com.evil.example", 403),
            ("null", 403),
        ]:
            answer = post_login(client, data={"token": token}, headers={"Origin": origin})
            assert answer.status_code == status, origin
    finally:
        public.plane.close()


def test_a_failure_behind_a_page_is_a_page_not_a_traceback(console: Console) -> None:
    def broken() -> dict[str, object]:
        raise StateError("the store is <b>damaged</b>", hint="appliance init")

    console.plane.status = broken  # type: ignore[method-assign]
    client = TestClient(console.app, base_url=BASE, raise_server_exceptions=False)
    post_login(client, data={"token": console.operator("ops-1", "operator")})
    page = client.get("/")
    assert page.status_code == 500 and page.headers["content-type"].startswith("text/html")
    assert "the store is &lt;b&gt;damaged&lt;/b&gt; (hint: appliance init)" in page.text
    assert "Traceback" not in page.text

    def unexpected() -> dict[str, object]:
        raise RuntimeError("boom")

    console.plane.status = unexpected  # type: ignore[method-assign]
    console.app.state.console.status.forget()
    page = client.get("/")
    assert page.status_code == 500 and "RuntimeError: boom" in page.text
    assert "Traceback" not in page.text
