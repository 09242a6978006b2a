"""Mounting the console: its routers, /static, the security headers, its refusal pages, and the
session lookup the API's auth dependency uses for a browser holding the console's cookie."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
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
from appliance.console.shared_read import PENDING_MAX_AGE_S, SharedRead
from appliance.control.plane import ControlPlane

STATIC = Path(__file__).parent / "static"
API_PREFIX = "/api/"
Handler = Callable[[Request, Exception], Awaitable[Response]]

# Every page module exposes `router`; a new page adds its module here (one line each).
ROUTERS = [auth, overview, approvals, kill, one_tap]
ROUTERS += [pages_agents, pages_spend, pages_audit]  # console-pages


@dataclass
class ConsoleState:
    """app.state.console: what the console keeps in memory, per app."""

    sessions: SessionStore = field(default_factory=SessionStore)
    logins: auth.LoginLimiter = field(default_factory=auth.LoginLimiter)
    status: SharedRead[dict[str, Any]] = field(default_factory=SharedRead)
    pending: SharedRead[list[dict[str, Any]]] = field(
        default_factory=lambda: SharedRead(PENDING_MAX_AGE_S)
    )


async def _login_required(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LoginRequired)
    response = RedirectResponse(login_url(exc.next_path), status_code=303)
    if COOKIE in request.cookies:  # forged, expired or revoked: the browser forgets it
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response


HEADINGS = {400: "Not done", 401: "Log in first", 403: "Not allowed", 404: "Not found"}


def error_page(request: Request, status: int, message: str) -> Response:
    heading = HEADINGS.get(status, "Not done")
    return render(request, "error.html", status=status, heading=heading, message=message)


async def _refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ConsoleRefused)
    return error_page(request, exc.status, exc.message)


def _as_page(api_handler: Handler) -> Handler:
    """The API's JSON error for /api/..., a page saying the same for the console's paths (an
    operator error, a bad form, an unknown path; an unexpected one is still logged)."""

    async def handle(request: Request, exc: Exception) -> Response:
        answer = await api_handler(request, exc)
        if request.url.path.startswith(API_PREFIX) or not isinstance(answer, JSONResponse):
            return answer
        error = json.loads(answer.body).get("error") or {}
        message = str(error.get("message") or "failed")
        if error.get("hint"):
            message += f" (hint: {error['hint']})"
        return error_page(request, answer.status_code, message)

    return handle


def install(app: FastAPI, plane: ControlPlane) -> None:
    app.state.console = ConsoleState()
    # deps.principal asks this for a request with no bearer token (no import of the console there)
    app.state.session_principal = api_principal
    app.add_exception_handler(LoginRequired, _login_required)
    app.add_exception_handler(ConsoleRefused, _refused)
    for error, api_handler in list(app.exception_handlers.items()):  # errors.install's
        if error not in (LoginRequired, ConsoleRefused):
            app.add_exception_handler(error, _as_page(api_handler))
    for module in ROUTERS:
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(SecurityHeaders)
