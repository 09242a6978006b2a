"""/one-tap/{token}: answer one held request from a phone, without logging in.

The link comes in an `approval.pending` notification (notify.one_tap: true); its token
(appliance/control/one_tap.py) is the only credential. GET shows what would be approved and one
button; only the POST that button sends approves. Chat apps, mail scanners and link previewers
fetch every URL they see with GET: were GET to approve, the preview would answer the request
before the operator saw it. The POST approves once (never persisted) as
Principal(kind="link", name="webhook:<hook>", role="operator"), through the same service as
POST /api/v1/approvals/{id}/approve, so it is audited as control.approval.approved by that
webhook; the token is used up by that POST whatever the outcome. The token names its sandbox
too (approval ids are random per proxy): the link shows and approves only that sandbox's held
request, and a link naming no sandbox approves nothing.

A token is checked (signature, expiry) on the event loop before any work is queued: a flood of
forged links costs an HMAC each. Pages answer with the status that says what happened: 200
approved or shown, 404 not a valid link / nothing held, 409 used before or decided already,
410 expired.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import Response

from appliance import errors
from appliance.console.approvals import pending_list
from appliance.console.render import render
from appliance.control.api import lanes
from appliance.control.api.deps import Principal
from appliance.control.one_tap import Claim, LinkExpired, LinkInvalid, LinkUsed

router = APIRouter(include_in_schema=False)

TEMPLATE = "one_tap.html"
CONFIRM = "approve"  # the form's `confirm` value: a POST without it approves nothing


def _page(request: Request, status: int, outcome: str, message: str, **ctx: Any) -> Response:
    return render(request, TEMPLATE, status=status, outcome=outcome, message=message, **ctx)


def _refusal(request: Request, exc: errors.ApplianceError) -> Response:
    if isinstance(exc, LinkUsed):
        return _page(request, 409, "used", str(exc))
    if isinstance(exc, LinkExpired):
        return _page(request, 410, "expired", str(exc))
    if isinstance(exc, errors.ConflictError):  # decided by someone else, or expired meanwhile
        outcome = "expired" if "already expired" in str(exc) else "decided"
        return _page(request, 409, outcome, str(exc))
    return _page(request, 404, "invalid", str(exc))


def _nameless(claim: Claim) -> LinkInvalid:
    return LinkInvalid(f"this one-tap link names no sandbox (approval {claim.approval_id})")


async def _held(
    request: Request, claim: Claim
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(the link's sandbox's pending entry, or None; how it was decided, or None)."""
    for fresh in (False, True):  # the console's shared listing; missing there, a new one
        if fresh:  # (a listing from before the request was held; only genuine links get here)
            request.app.state.console.pending.forget()
        for entry in await pending_list(request):
            if entry.get("id") == claim.approval_id and entry.get("sandbox") == claim.sandbox:
                return entry, None
    decisions = request.app.state.plane.approvals.decisions
    decided = await lanes.CONSOLE.run(decisions.get, claim.approval_id)
    if decided is not None and decided.get("sandbox") != claim.sandbox:
        decided = None  # another sandbox's request that happens to share the id
    return None, decided


@router.get("/one-tap/{token}")
async def confirm_page(token: str, request: Request) -> Response:
    plane = request.app.state.plane
    try:
        claim = plane.one_tap.verify(token)
        if claim.sandbox is None:
            raise _nameless(claim)
    except LinkInvalid as exc:
        return _refusal(request, exc)
    if await lanes.CONSOLE.run(plane.one_tap.used, claim):
        return _refusal(request, LinkUsed("this one-tap link was already used"))
    entry, decided = await _held(request, claim)
    if entry is None:
        if decided is not None:
            what = f"already {decided['decision']} by {decided['actor']}"
            outcome = "expired" if decided["decision"] == "expired" else "decided"
            return _page(request, 409, outcome, f"approval {claim.approval_id} was {what}")
        return _page(request, 404, "gone", f"approval {claim.approval_id} is no longer held")
    return _page(
        request,
        200,
        "confirm",
        "",
        entry=entry,
        token=token,
        confirm=CONFIRM,
        webhook=claim.webhook,
        expires_at=claim.expires_at,
    )


@router.post("/one-tap/{token}")
async def approve_once(token: str, request: Request, confirm: str = Form("")) -> Response:
    plane = request.app.state.plane
    if confirm != CONFIRM:
        return _page(request, 400, "invalid", "approve from the link's page (its button)")
    try:
        claim = plane.one_tap.verify(token)  # forged links cost no thread and no write
        if claim.sandbox is None:
            raise _nameless(claim)
        who = Principal("link", f"webhook:{claim.webhook}", "operator")
        request.state.principal = who  # the API's audit trail names the webhook, not "anonymous"
        claim = await lanes.CONSOLE.run(plane.one_tap.claim, token)
        approve = plane.approvals.approve
        decided = await lanes.CONSOLE.run(approve, who, claim.approval_id, False, claim.sandbox)
    except errors.ApplianceError as exc:
        return _refusal(request, exc)
    request.app.state.console.pending.forget()
    return _page(request, 200, "approved", f"approved {claim.approval_id}", entry=decided)
