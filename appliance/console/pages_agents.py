"""GET /agents (each agent's state, blueprint@version, uptime, schedule, spend against its budget,
last turns) and GET /agents/{name} (its transcript; for operators: run a turn, stop, start, and
kill through the kill switch's confirmation page). The fragments under /fragments/agents are
what the pages' script re-fetches (no full reload).

Reads and actions call the plane's services as GET/POST /api/v1/agents... do, off the event loop;
a turn runs on the API's turn lane (api/lanes.py, 429 when full) and goes on after the redirect:
its reply shows in the transcript when it ends. Every action is the operator's
(Principal kind "console"), audited with their name.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import quote

import anyio.to_thread
from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response

from appliance.console import agents_data
from appliance.console.render import render, render_fragment
from appliance.console.sessions import ConsoleRefused, PageOperator, PageViewer, flash
from appliance.control.api import lanes
from appliance.control.api.agents import MESSAGE_MAX
from appliance.control.api.deps import Principal
from appliance.control.api.errors import for_exception
from appliance.control.plane import ControlPlane
from appliance.errors import OPERATOR_ERRORS, NotFoundError
from sandbox.names import InvalidNameError, check_name, shown

router = APIRouter(include_in_schema=False)

LIST_REFRESH_MS = 5000
AGENT_REFRESH_MS = 2000
SESSION_MAX = 64  # as POST /api/v1/agents/{name}/turns
# Turns the console started and is draining (a task is kept only by a strong reference).
_draining: set[asyncio.Task[None]] = set()


def _plane(request: Request) -> ControlPlane:
    return request.app.state.plane


def _refusal(exc: Exception) -> ConsoleRefused:
    status, _ = for_exception(exc)
    hint = getattr(exc, "hint", None)
    return ConsoleRefused(status, f"{exc}" + (f" Hint: {hint}" if hint else ""))


def _no_agent(name: str) -> ConsoleRefused:
    """An unknown agent, or a name no agent can have: the same 404 page."""
    return ConsoleRefused(404, f"no agent named {shown(name)}")


def _page_of(name: str) -> str:
    return f"/agents/{quote(name, safe='')}"


# -- reads (worker threads) ------------------------------------------------------------------


def _summary(
    plane: ControlPlane,
    row: dict[str, Any],
    budget: dict[str, Any] | None,
    schedule: list[dict[str, Any]] | str,
    turns: int,
) -> agents_data.AgentSummary:
    line = (
        agents_data.ScheduleLine(error=schedule)
        if isinstance(schedule, str)
        else agents_data.schedule_line(schedule)
    )
    last = plane.turns.transcripts.last(row["name"], turns)
    return agents_data.summary(row, budget, line, last, time.time(), turns)


def _schedule(plane: ControlPlane, name: str) -> list[dict[str, Any]] | str:
    """The agent's schedule view, or why it cannot be read (its blueprint is gone)."""
    try:
        return plane.schedules.view(name)
    except OPERATOR_ERRORS as exc:
        return str(exc)


def _budgets(plane: ControlPlane) -> dict[str, dict[str, Any]]:
    return agents_data.budgets_by_agent(plane.keys.budgets(), plane.keys.list())


def agents_view(plane: ControlPlane) -> dict[str, Any]:
    """Every agent's summary, or the error that kept the inventory from being read (e.g. the
    host cannot run sandboxes: the page says so instead of failing)."""
    try:
        rows = plane.agents.list()
    except OPERATOR_ERRORS as exc:
        return {"agents": [], "error": str(exc)}
    budgets = _budgets(plane)
    agents = [
        _summary(
            plane,
            row,
            budgets.get(row["name"]),
            _schedule(plane, row["name"]),
            agents_data.LAST_TURNS,
        )
        for row in rows
    ]
    return {"agents": agents, "error": None}


def agent_view(plane: ControlPlane, name: str) -> dict[str, Any]:
    """One agent's summary with its schedule's entries and its last turns (NotFoundError for
    an unknown agent, InvalidNameError for a name no agent can have)."""
    check_name(name, "agent")
    row = plane.agents.get(name)
    schedule = _schedule(plane, name)
    agent = _summary(plane, row, _budgets(plane).get(name), schedule, agents_data.TRANSCRIPT_TURNS)
    return {"agent": agent, "entries": schedule if isinstance(schedule, list) else []}


def _agent_now(plane: ControlPlane, name: str) -> dict[str, Any]:
    """The agent's view, and whether a turn of it runs now (the page says so only then)."""
    view = agent_view(plane, name)
    view["turn_running"] = plane.turns.running(name) > 0
    return view


async def _agent(request: Request, name: str) -> dict[str, Any]:
    try:
        return await anyio.to_thread.run_sync(_agent_now, _plane(request), name)
    except (NotFoundError, InvalidNameError):
        raise _no_agent(name) from None
    except OPERATOR_ERRORS as exc:
        raise _refusal(exc) from None


# -- pages -------------------------------------------------------------------------------------


@router.get("/agents")
async def agents_page(request: Request, who: Principal = PageViewer) -> Response:
    view = await anyio.to_thread.run_sync(agents_view, _plane(request))
    return render(request, "agents.html", refresh_ms=LIST_REFRESH_MS, **view)


@router.get("/fragments/agents")
async def agents_fragment(request: Request, who: Principal = PageViewer) -> Response:
    view = await anyio.to_thread.run_sync(agents_view, _plane(request))
    return render_fragment(request, "_agents.html", **view)


@router.get("/agents/{name}")
async def agent_page(request: Request, name: str, who: Principal = PageViewer) -> Response:
    view = await _agent(request, name)
    return render(
        request, "agent.html", refresh_ms=AGENT_REFRESH_MS, message_max=MESSAGE_MAX, **view
    )


@router.get("/fragments/agents/{name}")
async def agent_fragment(request: Request, name: str, who: Principal = PageViewer) -> Response:
    return render_fragment(request, "_agent.html", **await _agent(request, name))


# -- actions (operator) ------------------------------------------------------------------------


async def _drain(events: lanes.LaneStream[dict[str, Any]]) -> None:
    """Run a turn to its end (its record goes to the transcript and the audit log)."""
    try:
        async for _event in events:
            pass
    finally:
        await events.aclose()


@router.post("/agents/{name}/turn")
async def run_turn(
    request: Request,
    name: str,
    message: str = Form(""),
    session: str = Form(""),
    who: Principal = PageOperator,
) -> Response:
    """Start a turn as POST /api/v1/agents/{name}/turns does; refused ones (the kill switch
    holds, the budget is spent, the lane is full) are said on the agent's page."""
    if not message.strip():
        flash(request, "error", "Write a message for the agent first.")
    elif len(message) > MESSAGE_MAX:
        flash(request, "error", f"A message is at most {MESSAGE_MAX:,} characters.")
    elif len(session) > SESSION_MAX:
        flash(request, "error", "A session name is 1-40 of a-z, 0-9 and '-'.")
    else:
        plane = _plane(request)
        start = plane.turns.start
        try:
            events = await lanes.TURNS.open(start, who, name, message, session.strip() or None)
        except (NotFoundError, InvalidNameError):
            raise _no_agent(name) from None
        except OPERATOR_ERRORS as exc:
            flash(request, "error", f"The turn was not started: {exc}")
        else:
            task = asyncio.ensure_future(_drain(events))
            _draining.add(task)
            task.add_done_callback(_draining.discard)
    return RedirectResponse(_page_of(name), status_code=303)


async def _change(request: Request, name: str, who: Principal, action: str) -> Response:
    plane = _plane(request)
    change = plane.agents.stop if action == "stop" else plane.agents.start
    try:
        row = await anyio.to_thread.run_sync(change, who, name)
    except (NotFoundError, InvalidNameError):
        raise _no_agent(name) from None
    except OPERATOR_ERRORS as exc:
        done = "stopped" if action == "stop" else "started"
        flash(request, "error", f"{name} was not {done}: {exc}")
    else:
        flash(request, "ok", f"{row['name']} is {row['state']}.")
    request.app.state.console.status.forget()
    return RedirectResponse(_page_of(name), status_code=303)


@router.post("/agents/{name}/stop")
async def stop_agent(request: Request, name: str, who: Principal = PageOperator) -> Response:
    return await _change(request, name, who, "stop")


@router.post("/agents/{name}/start")
async def start_agent(request: Request, name: str, who: Principal = PageOperator) -> Response:
    return await _change(request, name, who, "start")
