"""The console's pages over a real control plane app (create_app, a temp state dir), driven by
FastAPI's TestClient as a browser would: log in with an operator token, keep the session cookie,
send each form's CSRF token (read from the page, as the browser has it)."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from appliance.control.api import create_app
from appliance.control.plane import ControlPlane

BASE = "http://127.0.0.1"
_CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]+)">')


def operator_token(plane: ControlPlane, name: str, role: str) -> str:
    _, token = plane.operators.create(name, role, {"actor": "test"})
    return token


def browser(plane: ControlPlane) -> TestClient:
    """A client of the plane's app (use it in a `with` block: one event loop for the block, so
    work a page leaves running, a turn, goes on between requests)."""
    return TestClient(create_app(plane), base_url=BASE, follow_redirects=False)


def log_in(client: TestClient, token: str) -> str:
    """Log in; the session's CSRF token, as the pages carry it."""
    answer = client.post("/login", data={"token": token, "next": "/"})
    assert answer.status_code == 303, answer.text
    page = client.get("/audit")
    found = _CSRF_META.search(page.text)
    assert found, page.text[:2000]
    return found.group(1)
