"""The console's logins: server-side sessions in memory, and the page dependencies that use them.

A session is made only by a login with an operator token (auth.py) under a new random id; a
cookie naming an id the store never made (forged, fixed by someone else, or from before a
restart) is no session. The browser holds only the id (`appliance_session`, HttpOnly,
SameSite=Strict); the session holds the operator's name and role, its CSRF token and its flash
messages. Every request re-checks the operator: one revoked (or re-created under the same name)
since the login is logged out at once, not when the cookie expires. Only what the operator does
restarts the idle clock: the live refresh's background polls (a /fragments/ path, or a request
the console's script marks with X-Console-Poll) do not, so an open tab left alone still logs
out after IDLE_S.

Pages take `who: Principal = PageViewer` (or PageOperator): an anonymous GET is sent to the login
page (303), an anonymous POST refused (401), a role too low refused (403), and a POST whose form
lacks the session's CSRF token refused (403) before the route runs.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from fastapi import Depends, HTTPException, Request

from appliance.console.security import origin_of, same_origin
from appliance.control.api import lanes
from appliance.control.api.deps import Principal
from appliance.control.operators import ROLES, Role

if TYPE_CHECKING:
    from appliance.control.operators import Operator
    from appliance.control.plane import ControlPlane

COOKIE = "appliance_session"
CSRF_FIELD = "csrf"  # every console form's hidden field
CSRF_HEADER = "x-csrf-token"  # the console's JS calling /api/v1 with the session cookie
POLL_HEADER = "x-console-poll"  # the console's JS: a background refresh, not the operator
ABSOLUTE_S = 8 * 3600  # a session ends 8 h after its login ...
IDLE_S = 30 * 60  # ... or after 30 minutes without a request
MAX_SESSIONS = 1024  # beyond: the least recently active is dropped (logins are operators' only)
SESSION_ID_MAX = 64  # token_urlsafe(32) is 43 characters; a longer cookie is not looked up
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_UNSET = object()


@dataclass
class Session:
    id: str
    operator: str
    role: Role
    operator_created_at: float  # tells this operator from a later one of the same name
    csrf: str
    started: float
    seen: float
    flashes: list[tuple[str, str]] = field(default_factory=list)  # (kind, text), shown once

    def principal(self) -> Principal:
        return Principal("console", self.operator, self.role)

    def may(self, role: Role) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)

    def csrf_matches(self, offered: object) -> bool:
        if not isinstance(offered, str):
            return False
        return hmac.compare_digest(offered.encode(), self.csrf.encode())


class SessionStore:
    """In memory, so a restart of the control plane logs everyone out. Locked: pages run on the
    event loop, but nothing stops a sync route from looking a session up on a worker thread."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, operator: Operator) -> Session:
        now = self.clock()
        session = Session(
            id=secrets.token_urlsafe(32),
            operator=operator.name,
            role=operator.role,
            operator_created_at=operator.created_at,
            csrf=secrets.token_urlsafe(32),
            started=now,
            seen=now,
        )
        with self._lock:
            if len(self._sessions) >= MAX_SESSIONS:
                oldest = min(self._sessions.values(), key=lambda s: s.seen)
                del self._sessions[oldest.id]
            self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None, active: bool = True) -> Session | None:
        """The live session with this id, or None. `active`: the operator did something (not
        a background poll): the idle clock restarts."""
        if not session_id or len(session_id) > SESSION_ID_MAX:
            return None
        now = self.clock()
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                return None
            if now - session.started > ABSOLUTE_S or now - session.seen > IDLE_S:
                del self._sessions[session_id]
                return None
            if active:
                session.seen = now
            return session

    def drop(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._sessions)


def store_of(request: Request) -> SessionStore:
    return request.app.state.console.sessions


async def operator_still_live(plane: ControlPlane, session: Session) -> bool:
    """The session's operator is live, and the same one (not revoked and re-created since)."""
    live = await lanes.AUTH.run(plane.operators.list, False)
    return any(
        o.name == session.operator
        and o.role == session.role
        and o.created_at == session.operator_created_at
        for o in live
    )


def background_poll(request: Request) -> bool:
    """A request the operator did not make: the live refresh's fragment polls."""
    return request.url.path.startswith("/fragments/") or POLL_HEADER in request.headers


async def current_session(request: Request) -> Session | None:
    """The request's session, checked; also kept on request.state for templates and the audit
    trail (which records the operator's name with every console POST)."""
    cached = getattr(request.state, "console_session", _UNSET)
    if cached is not _UNSET:
        return cached
    store = store_of(request)
    session = store.get(request.cookies.get(COOKIE), active=not background_poll(request))
    if session is not None and not await operator_still_live(request.app.state.plane, session):
        store.drop(session.id)
        session = None
    request.state.console_session = session
    if session is not None:
        request.state.principal = session.principal()
    return session


class LoginRequired(Exception):
    """An anonymous GET of a page: answered with a 303 to the login page (app.py)."""

    def __init__(self, next_path: str) -> None:
        super().__init__("log in first")
        self.next_path = next_path


class ConsoleRefused(Exception):
    """A refusal shown as a page, not as the API's JSON (app.py)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def login_url(next_path: str) -> str:
    return "/login" if next_path in ("", "/") else f"/login?next={quote(next_path, safe='/')}"


def safe_next(next_path: str | None) -> str:
    """Where to go after the login: a path on this site only (never `//evil` or a URL)."""
    if not next_path or not next_path.startswith("/") or next_path.startswith(("//", "/\\")):
        return "/"
    return next_path if len(next_path) <= 512 and next_path.isprintable() else "/"


def check_origin(request: Request) -> None:
    """A browser's form post names the page it came from: this host, or the console's public
    URL (notify.console_url: the operator's reverse proxy, which may rewrite Host)."""
    origin = request.headers.get("origin")
    if same_origin(origin, request.headers.get("host")):
        return
    notify = getattr(request.app.state.plane.config, "notify", None)
    public = getattr(notify, "console_url", None)
    if origin is not None and public and origin.lower() == origin_of(public):
        return
    raise ConsoleRefused(403, "a form posted from another site is refused")


async def check_csrf(request: Request, session: Session) -> None:
    """A form POST carries the session's CSRF token in its hidden field."""
    form = await request.form()  # cached on the request: the route's Form fields read it again
    if not session.csrf_matches(form.get(CSRF_FIELD)):
        raise ConsoleRefused(403, "the form's CSRF token is missing or wrong: reload the page")


def page(role: Role) -> Callable[..., Any]:
    async def check(request: Request) -> Principal:
        session = await current_session(request)
        unsafe = request.method not in SAFE_METHODS
        if session is None:
            if not unsafe:  # back to this page after the login (a fragment's page: its script)
                path = request.url.path
                raise LoginRequired("/" if path.startswith("/fragments/") else path)
            raise ConsoleRefused(401, "log in first")
        if not session.may(role):
            raise ConsoleRefused(403, f"{session.operator} is a {session.role}; this needs {role}")
        if unsafe:
            check_origin(request)
            await check_csrf(request, session)
        return session.principal()

    return check


async def api_principal(request: Request) -> Principal | None:
    """For /api/v1 (deps.principal): the session's operator when the request carries the console
    cookie (and, for a method that may change something, the X-CSRF-Token header), else None."""
    if not request.cookies.get(COOKIE):
        return None
    session = await current_session(request)
    if session is None:
        return None
    if request.method not in SAFE_METHODS and not session.csrf_matches(
        request.headers.get(CSRF_HEADER)
    ):
        raise HTTPException(403, "the console session needs its X-CSRF-Token header here")
    return session.principal()


def flash(request: Request, kind: str, text: str) -> None:
    """A message for the session's next page (after a POST's redirect)."""
    session: Session | None = getattr(request.state, "console_session", None)
    if session is not None:
        session.flashes.append((kind, text))


# What pages take: `who: Principal = PageViewer`.
PageViewer = Depends(page("viewer"))
PageOperator = Depends(page("operator"))
