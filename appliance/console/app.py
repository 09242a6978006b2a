"""Mounting the console: its routers, /static, the security headers, its refusal pages, and the
session lookup the API's auth dependency uses for a browser holding the console's cookie."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from appliance.console import (
    approvals,
    auth,
    kill,
    one_tap,
    overview,
    pages_agents,
    pages_audit,
    pages_spend,
)
from appliance.console.render import render
from appliance.console.security import SecurityHeaders
from appliance.console.sessions import (
    COOKIE,
    ConsoleRefused,
    LoginRequired,
    SessionStore,
    api_principal,
    login_url,
)
from appliance.console.status_cache import StatusCache
from appliance.control.plane import ControlPlane

STATIC = Path(__file__).parent / "static"

# Every page module exposes `router`; a new page adds its module here (one line each).
ROUTERS = [auth, overview, approvals, kill, one_tap]
ROUTERS += [pages_agents, pages_spend, pages_audit]  # console-pages


@dataclass
class ConsoleState:
    """app.state.console: what the console keeps in memory, per app."""

    sessions: SessionStore = field(default_factory=SessionStore)
    logins: auth.LoginLimiter = field(default_factory=auth.LoginLimiter)
    status: StatusCache = field(default_factory=StatusCache)


async def _login_required(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LoginRequired)
    response = RedirectResponse(login_url(exc.next_path), status_code=303)
    if COOKIE in request.cookies:  # forged, expired or revoked: the browser forgets it
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response


async def _refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ConsoleRefused)
    return render(request, "error.html", status=exc.status, message=exc.message)


def install(app: FastAPI, plane: ControlPlane) -> None:
    app.state.console = ConsoleState()
    # deps.principal asks this for a request with no bearer token (no import of the console there)
    app.state.session_principal = api_principal
    app.add_exception_handler(LoginRequired, _login_required)
    app.add_exception_handler(ConsoleRefused, _refused)
    for module in ROUTERS:
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(SecurityHeaders)
