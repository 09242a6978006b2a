"""/api/v1/approvals: pending egress requests across sandboxes; approve (persist) or deny; the
decisions taken (history). 404 for an id nobody holds, 409 for one already decided or expired
(appliance/control/approvals.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from pydantic import BaseModel

from appliance.control.api.deps import Operator, Plane, Principal, Viewer
from appliance.control.plane import ControlPlane

router = APIRouter(tags=["approvals"])


class Approve(BaseModel):
    persist: bool = False


@router.get("/approvals")
def list_approvals(who: Principal = Viewer, plane: ControlPlane = Plane) -> list[dict[str, Any]]:
    return plane.approvals.list()


@router.get("/approvals/history")
def approval_history(
    limit: int = Query(100, ge=1, le=1000),
    who: Principal = Viewer,
    plane: ControlPlane = Plane,
) -> list[dict[str, Any]]:
    """Decisions taken, newest first: approved, denied or expired; by whom, when."""
    return plane.approvals.history(limit)


@router.post("/approvals/{approval_id}/approve")
def approve(
    approval_id: str,
    body: Approve | None = None,
    who: Principal = Operator,
    plane: ControlPlane = Plane,
) -> dict[str, Any]:
    return plane.approvals.approve(who, approval_id, persist=body is not None and body.persist)


@router.post("/approvals/{approval_id}/deny")
def deny(
    approval_id: str, who: Principal = Operator, plane: ControlPlane = Plane
) -> dict[str, Any]:
    return plane.approvals.deny(who, approval_id)
