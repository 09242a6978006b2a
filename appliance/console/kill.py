"""GET /kill: the kill switch: kill one sandbox (an agent's has the agent's name), kill all with
hold, release the hold. Each goes through a confirmation page (GET /kill/confirm, a plain page
with the CSRF form: no script needed) before the POST that acts; the POSTs call the plane's
kill_switch exactly as POST /api/v1/kill and /release do, as the operator (audited by name)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response

from appliance import errors
from appliance.console.overview import status_report
from appliance.console.render import render
from appliance.console.sessions import ConsoleRefused, PageOperator, PageViewer, flash
from appliance.control.api import lanes
from appliance.control.api.deps import Principal

router = APIRouter(include_in_schema=False)

Action = Literal["one", "all", "release"]
REASON = "operator kill switch (console)"
REASON_MAX = 1000  # as POST /api/v1/kill


def _sandboxes(report: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    section = report.get("sandboxes") or {}
    return list(section.get("sandboxes") or []), section.get("held")


@router.get("/kill")
async def kill_page(request: Request, who: Principal = PageViewer) -> Response:
    report = await status_report(request)
    sandboxes, held = _sandboxes(report)
    agents = {a.get("name"): a for a in (report.get("agents") or {}).get("agents") or []}
    return render(request, "kill.html", sandboxes=sandboxes, held=held, agents=agents)


@router.get("/kill/confirm")
async def kill_confirm(
    request: Request,
    action: Action,
    name: str = "",
    hold: str = "",
    who: Principal = PageOperator,
) -> Response:
    if action == "one" and not name:
        raise ConsoleRefused(400, "choose a sandbox to kill")
    return render(
        request,
        "kill_confirm.html",
        action=action,
        name=name,
        hold=hold == "1",
        reason=REASON,
    )


@router.post("/kill")
async def kill(
    request: Request,
    action: Action = Form(...),
    name: str = Form(""),
    hold: str = Form(""),
    reason: str = Form(REASON, max_length=REASON_MAX),
    confirmed: str = Form(""),
    who: Principal = PageOperator,
) -> Response:
    if confirmed != "yes" or action == "release":
        raise ConsoleRefused(400, "the kill switch acts only from its confirmation page")
    if action == "one" and not name:
        raise ConsoleRefused(400, "choose a sandbox to kill")
    plane = request.app.state.plane
    names = [name] if action == "one" else []
    all_ = action == "all"

    def pull() -> dict[str, Any]:
        return plane.kill_switch.kill(who, names, all_, hold == "1", reason or REASON)

    try:
        result = await lanes.CONTROL.run(pull)
    except errors.OPERATOR_ERRORS as exc:
        flash(request, "error", str(exc))
    else:
        stopped = ", ".join(result["stopped"]) or "nothing was running"
        held = " New sandboxes are held until released." if result["hold"] else ""
        flash(request, "ok", f"Stopped: {stopped}.{held}")
    request.app.state.console.status.forget()
    return RedirectResponse("/kill", status_code=303)


@router.post("/release")
async def release(
    request: Request, confirmed: str = Form(""), who: Principal = PageOperator
) -> Response:
    if confirmed != "yes":
        raise ConsoleRefused(400, "the kill switch acts only from its confirmation page")
    plane = request.app.state.plane
    try:
        await lanes.CONTROL.run(lambda: plane.kill_switch.release(who))
    except errors.OPERATOR_ERRORS as exc:
        flash(request, "error", str(exc))
    else:
        flash(request, "ok", "The hold is released: sandboxes may start again.")
    request.app.state.console.status.forget()
    return RedirectResponse("/kill", status_code=303)
