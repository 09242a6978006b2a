"""/api/v1/audit: the audit log's last records (and what follows a cursor), and its verification."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query

from appliance.audit import audit_path
from appliance.control import audit_reader
from appliance.control.api.deps import Plane, Principal, Viewer
from appliance.control.plane import ControlPlane

router = APIRouter(tags=["audit"])


@router.get("/audit")
def tail(
    limit: int = Query(20, ge=0, le=100_000),
    event: str | None = Query(None, description="a glob, e.g. 'egress.*'"),
    sandbox: str | None = None,
    after: int | None = Query(None, ge=0, description="the `next` of an earlier answer"),
    who: Principal = Viewer,
    plane: ControlPlane = Plane,
) -> dict[str, Any]:
    """{"records": [...], "next": offset}: the last `limit` matching records, oldest first; with
    `after`, the matching records appended since (poll with each answer's `next`)."""
    path = audit_path(plane.config.state_dir)
    return audit_reader.tail(path, limit, event, sandbox, after)


@router.get("/audit/verify")
def verify(who: Principal = Viewer, plane: ControlPlane = Plane) -> dict[str, Any]:
    """Every record's hash and the links between them; `ok` false names each problem."""
    return audit_reader.verification(audit_path(plane.config.state_dir))
