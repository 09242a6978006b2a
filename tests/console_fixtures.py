"""The web console in unit tests: the control plane's real app (create_app, so its host check,
audit trail and security headers are all there) over a real ControlPlane on the test's state dir,
real operators and their tokens, and a TestClient that logs in through the login form.

Only what would reach Podman or the GPUs is replaced, per test: `plane.status` (a report), the
approvals service (pending entries) and the kill switch (what it was asked)."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from appliance.audit import audit_path, records
from appliance.config import load_config
from appliance.console.sessions import COOKIE
from appliance.control.api import create_app
from appliance.control.api.deps import Principal
from appliance.control.plane import ControlPlane
from appliance.errors import ConflictError, NotFoundError

BASE = "http://127.0.0.1:8070"
SETUP = Principal("system", "test-setup", "admin")


class Console:
    def __init__(self, state_dir: Path, config: dict[str, Any] | None = None) -> None:
        self.plane = ControlPlane(load_config({"state_dir": str(state_dir), **(config or {})}))
        self.app = create_app(self.plane)
        self.tokens: dict[str, str] = {}

    def operator(self, name: str, role: str) -> str:
        _, token = self.plane.operators.create(name, role, SETUP.audit_fields())
        self.tokens[name] = token
        return token

    def client(self, base_url: str = BASE) -> TestClient:
        return TestClient(self.app, base_url=base_url, follow_redirects=False)

    def logged_in(self, name: str, role: str = "operator", base_url: str = BASE) -> TestClient:
        token = self.tokens.get(name) or self.operator(name, role)
        client = self.client(base_url)
        answer = post_login(client, data={"token": token})
        assert answer.status_code == 303, answer.text
        return client

    def audit(self) -> list[dict[str, Any]]:
        return list(records(audit_path(self.plane.config.state_dir)))


def csrf_of(page: str) -> str:
    """The CSRF token a page's forms carry (the base template's meta tag)."""
    found = re.search(r'<meta name="csrf-token" content="([^"]+)">', page)
    assert found, "no CSRF token on the page"
    return found.group(1)


def session_cookie(client: TestClient) -> str | None:
    return client.cookies.get(COOKIE)


class FakeApprovals:
    """ApprovalService's surface: pending entries as a proxy lists them; decisions recorded,
    a second decision on one id a ConflictError (409), an unknown id a NotFoundError (404)."""

    def __init__(self, pending: list[dict[str, Any]] | None = None) -> None:
        self.pending = list(pending or [])
        self.decided: list[tuple[str, str, bool, Principal]] = []
        self.threads: list[str] = []

    def list(self) -> list[dict[str, Any]]:
        self.threads.append(threading.current_thread().name)
        return [dict(p) for p in self.pending]

    def history(self, limit: int = 100) -> list[dict[str, Any]]:
        return [
            {"id": i, "sandbox": "box", "host": "h", "port": 443, "decision": d,
             "actor": who.name, "decided_at": 1_700_000_000.0}
            for i, d, _, who in reversed(self.decided)
        ][:limit]  # fmt: skip

    def _decide(self, who: Principal, approval_id: str, decision: str, persist: bool) -> dict:
        if any(d[0] == approval_id for d in self.decided):
            raise ConflictError(f"approval {approval_id} was already decided")
        entry = next((p for p in self.pending if p["id"] == approval_id), None)
        if entry is None:
            raise NotFoundError(f"no pending approval {approval_id!r}")
        self.pending.remove(entry)
        self.decided.append((approval_id, decision, persist, who))
        return {**entry, "decision": decision, "persisted": persist, "rev": 7 if persist else None}

    def approve(self, who: Principal, approval_id: str, persist: bool) -> dict[str, Any]:
        return self._decide(who, approval_id, "approved", persist)

    def deny(self, who: Principal, approval_id: str) -> dict[str, Any]:
        return self._decide(who, approval_id, "denied", False)

    def close(self) -> None:
        pass


class FakeKillSwitch:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def kill(
        self, who: Principal, names: list[str], all_: bool, hold: bool, reason: str
    ) -> dict[str, Any]:
        self.calls.append(("kill", who, list(names), all_, hold, reason))
        return {"stopped": names or ["a", "b"], "hold": hold}

    def release(self, who: Principal) -> dict[str, Any]:
        self.calls.append(("release", who))
        return {"hold": False}


def report(**sections: Any) -> dict[str, Any]:
    """A status report as plane.status() gives it, with what a test sets."""
    base: dict[str, Any] = {
        "taken_at": 1_700_000_000.0,
        "host": {"host_class": "rtx", "cpu_count": 16, "memory_total_mib": 65536,
                 "memory_available_mib": 32768, "product_name": "Workstation"},
        "gpus": {"count": 0, "devices": []},
        "inference": {"state": "ready", "metrics": None, "plan": None},
        "gateway": {"state": "ready", "url": "http://127.0.0.1:8080/v1"},
        "budgets": {"keys": [], "throughput": None},
        "sandboxes": {"count": 0, "sandboxes": [], "held": None},
        "approvals": {"count": 0, "pending": []},
        "agents": {"count": 0, "agents": [], "error": None},
    }  # fmt: skip
    base.update(sections)
    return base


def opened_console(tmp_path: Path) -> Iterator[Console]:
    """For a test module's `console` fixture: `yield from opened_console(tmp_path)`."""
    this = Console(tmp_path / "state")
    this.plane.status = lambda: report()  # type: ignore[method-assign]
    try:
        yield this
    finally:
        this.plane.close()


def post_login(
    client: TestClient, data: dict[str, str], headers: dict[str, str] | None = None
) -> Any:
    """POST /login as the login page's form does: with the login page's CSRF token in its
    hidden field and its cookie (fetched by a client of its own: `client` may hold a session)."""
    from appliance.console.auth import LOGIN_CSRF_COOKIE

    blank = TestClient(client.app, base_url=str(client.base_url), follow_redirects=False)
    page = blank.get("/login")
    assert page.status_code == 200, page.text
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found and blank.cookies[LOGIN_CSRF_COOKIE] == found.group(1)
    cookie = f"{LOGIN_CSRF_COOKIE}={found.group(1)}"
    headers = dict(headers or {})
    if "Cookie" in headers:  # a test's own cookies: the login page's is added to them
        headers["Cookie"] += f"; {cookie}"
    else:
        for each in blank.cookies.jar:
            client.cookies.jar.set_cookie(each)
    return client.post("/login", data={**data, "csrf": found.group(1)}, headers=headers)
