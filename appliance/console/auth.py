"""GET/POST /login (an operator token -> a session) and POST /logout.

The token is read from the form, checked off the event loop (lanes.AUTH, as the API's bearer
tokens are) and forgotten: the session keeps the operator, never the token. A login always makes
a new session id (an id the browser brought is dropped, never adopted). Failed logins are
answered 401, which the audit trail records (client address, never the token), and limited per
client address: after FAILURES_ALLOWED within WINDOW_S, 429 without looking the token up.

The login form has a CSRF token too, before any session exists (double submit): each login page
sets a fresh random value in a short-lived cookie (HttpOnly, SameSite=Strict, Path=/login) and
in the form's hidden field; a POST whose field and cookie do not match is refused (403) before
the token is looked at. Another site can neither read the cookie nor make the browser send it,
so it cannot log a victim's browser into its own session (login CSRF), Origin header or not.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from appliance.console.render import render
from appliance.console.sessions import (
    COOKIE,
    PageViewer,
    check_origin,
    current_session,
    safe_next,
    store_of,
)
from appliance.control.api import lanes
from appliance.control.api.deps import Principal
from appliance.control.operators import Operator

router = APIRouter(include_in_schema=False)

FAILURES_ALLOWED = 10
WINDOW_S = 60.0
TOKEN_MAX = 512  # operator tokens are ~50 characters; a longer one is refused unread
CLIENTS_TRACKED = 4096  # beyond: the limiter forgets the quietest client
LOGIN_CSRF_COOKIE = "appliance_login_csrf"
LOGIN_CSRF_S = 30 * 60  # a login page left open longer is reloaded (a new token)


class LoginLimiter:
    """Failed logins per client address in a sliding window."""

    def __init__(
        self,
        allowed: int = FAILURES_ALLOWED,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.allowed, self.window_s, self.clock = allowed, window_s, clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> deque[float]:
        failures = self._failures.get(client, deque())
        while failures and now - failures[0] > self.window_s:
            failures.popleft()
        return failures

    def blocked(self, client: str) -> bool:
        with self._lock:
            return len(self._recent(client, self.clock())) >= self.allowed

    def failed(self, client: str) -> None:
        now = self.clock()
        with self._lock:
            failures = self._recent(client, now)
            failures.append(now)
            self._failures[client] = failures
            if len(self._failures) > CLIENTS_TRACKED:
                quietest = min(self._failures, key=lambda c: self._failures[c][-1])
                del self._failures[quietest]


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


def _login_page(request: Request, status: int, error: str | None, next_path: str) -> Response:
    """The login form with a new pre-session CSRF token, in its field and its cookie."""
    csrf = secrets.token_urlsafe(32)
    response = render(
        request, "login.html", status=status, error=error, next=next_path, login_csrf=csrf
    )
    response.set_cookie(
        LOGIN_CSRF_COOKIE,
        csrf,
        max_age=LOGIN_CSRF_S,
        httponly=True,
        samesite="strict",
        path="/login",
        secure=request.url.scheme == "https",
    )
    return response


def _login_csrf_matches(request: Request, offered: object) -> bool:
    expected = request.cookies.get(LOGIN_CSRF_COOKIE)
    if not isinstance(offered, str) or not expected or not offered:
        return False
    return hmac.compare_digest(offered.encode(), expected.encode())


@router.get("/login")
async def login_form(request: Request, next: str = "/") -> Response:
    if await current_session(request) is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    return _login_page(request, 200, None, safe_next(next))


@router.post("/login")
async def login(request: Request) -> Response:
    check_origin(request)
    form = await request.form(max_files=0, max_fields=8)
    next_path = safe_next(str(form.get("next") or "/"))
    if not _login_csrf_matches(request, form.get("csrf")):
        refused = "the login form expired or was not sent from this page: log in again"
        return _login_page(request, 403, refused, next_path)
    limiter = request.app.state.console.logins
    client = _client(request)
    if limiter.blocked(client):
        wait = f"{limiter.window_s:.0f} s"
        return _login_page(request, 429, f"too many failed logins: wait {wait}", next_path)
    token = form.get("token")
    operator: Operator | None = None
    if isinstance(token, str) and 0 < len(token.strip()) <= TOKEN_MAX:
        authenticate = request.app.state.plane.authenticate_operator
        operator = await lanes.AUTH.run(authenticate, token.strip())
    if operator is None:
        limiter.failed(client)
        return _login_page(request, 401, "unknown or revoked operator token", next_path)
    store = store_of(request)
    if old := request.cookies.get(COOKIE):
        store.drop(old)  # a new id at every login: an id planted in the browser is never used
    session = store.create(operator)
    request.state.principal = session.principal()  # the audit trail records who logged in
    response = RedirectResponse(next_path, status_code=303)
    response.set_cookie(
        COOKIE,
        session.id,
        httponly=True,
        samesite="strict",
        path="/",
        secure=request.url.scheme == "https",  # plain http on loopback: a Secure cookie is lost
    )
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/login", httponly=True, samesite="strict")
    return response


@router.post("/logout")
async def logout(request: Request, who: Principal = PageViewer) -> Response:
    session = request.state.console_session
    store_of(request).drop(session.id)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response
