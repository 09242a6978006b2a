"""GET /approvals: pending egress requests (sandbox, host, port, method, path, age, time left)
with approve once / approve and persist / deny (operator and admin), and the decisions taken.
GET /fragments/approvals/pending is re-fetched every second by the page's script, so a new
request shows without a reload. Each row is id="a-<id>": notifications link to /approvals#a-<id>.

The forms call the same service as POST /api/v1/approvals/{id}/approve|deny, as the operator
(Principal kind "console"): audited with their name. A 404 (gone: expired meanwhile) or a 409
(another operator was first) is a message on the page, not an error page.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response

from appliance import errors
from appliance.console.render import render, render_fragment
from appliance.console.sessions import PageOperator, PageViewer, flash
from appliance.control.api import lanes
from appliance.control.api.deps import Principal

router = APIRouter(include_in_schema=False)

REFRESH_MS = 1000
HISTORY_SHOWN = 50


async def pending_list(request: Request) -> list[dict[str, Any]]:
    """Every proxy's pending entries, shared by every open tab (one listing at a time, reused
    for PENDING_MAX_AGE_S): N tabs polling a hung proxy cost one listing, not N."""
    plane = request.app.state.plane
    return await request.app.state.console.pending.get(plane.approvals.list)


async def _pending(request: Request) -> tuple[list[dict[str, Any]], str | None]:
    try:
        pending = await pending_list(request)
    except errors.OPERATOR_ERRORS as exc:  # no sandboxes set up here, say
        return [], str(exc)
    return sorted(pending, key=lambda p: p.get("created") or 0), None


async def _history(request: Request) -> list[dict[str, Any]]:
    service = request.app.state.plane.approvals
    return await lanes.CONSOLE.run(service.history, HISTORY_SHOWN)


@router.get("/approvals")
async def approvals_page(request: Request, who: Principal = PageViewer) -> Response:
    pending, problem = await _pending(request)
    return render(
        request,
        "approvals.html",
        pending=pending,
        problem=problem,
        history=await _history(request),
        refresh_ms=REFRESH_MS,
    )


@router.get("/fragments/approvals/pending")
async def pending_fragment(request: Request, who: Principal = PageViewer) -> Response:
    pending, problem = await _pending(request)
    return render_fragment(request, "_approvals_pending.html", pending=pending, problem=problem)


@router.get("/fragments/approvals/history")
async def history_fragment(request: Request, who: Principal = PageViewer) -> Response:
    return render_fragment(request, "_approvals_history.html", history=await _history(request))


async def _decide(request: Request, verb: str, approval_id: str, persist: bool) -> Response:
    who: Principal = request.state.principal
    service = request.app.state.plane.approvals
    try:
        if verb == "deny":
            decided = await lanes.CONSOLE.run(service.deny, who, approval_id)
        else:
            decided = await lanes.CONSOLE.run(service.approve, who, approval_id, persist)
    except errors.OPERATOR_ERRORS as exc:
        flash(request, "error", str(exc))
    else:
        kept = f" and persisted (policy rev {decided['rev']})" if decided.get("persisted") else ""
        where = f"{decided['sandbox']} → {decided['host']}:{decided['port']}"
        flash(request, "ok", f"{decided['decision']}{kept}: {where}")
    request.app.state.console.pending.forget()  # the next page shows it gone
    return RedirectResponse("/approvals", status_code=303)


@router.post("/approvals/{approval_id}/approve")
async def approve(
    request: Request,
    approval_id: str,
    persist: str = Form(""),
    who: Principal = PageOperator,
) -> Response:
    return await _decide(request, "approve", approval_id, persist == "1")


@router.post("/approvals/{approval_id}/deny")
async def deny(request: Request, approval_id: str, who: Principal = PageOperator) -> Response:
    return await _decide(request, "deny", approval_id, False)
