"""The console's pages over a control plane a test already has (tests/turn_fixtures.py's, with
its agent), through its real app (create_app), driven by FastAPI's TestClient as a browser
would: log in with an operator token, keep the session cookie, send each form's CSRF token as
read from the page (tests/console_fixtures.py builds its own plane instead)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from appliance.control.api import create_app
from appliance.control.plane import ControlPlane
from tests.console_fixtures import csrf_of, post_login

BASE = "http://127.0.0.1"


def operator_token(plane: ControlPlane, name: str, role: str) -> str:
    _, token = plane.operators.create(name, role, {"actor": "test"})
    return token


def browser(plane: ControlPlane) -> TestClient:
    """A client of the plane's app (use it in a `with` block: one event loop for the block, so
    work a page leaves running, a turn, goes on between requests)."""
    return TestClient(create_app(plane), base_url=BASE, follow_redirects=False)


def log_in(client: TestClient, token: str) -> str:
    """Log in; the session's CSRF token, as the pages carry it."""
    answer = post_login(client, data={"token": token, "next": "/"})
    assert answer.status_code == 303, answer.text
    return csrf_of(client.get("/audit").text)
