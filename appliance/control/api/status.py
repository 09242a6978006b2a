"""GET /api/v1/status: what `appliance status --json` prints."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from appliance.control.api import lanes
from appliance.control.api.deps import Plane, Principal, Viewer
from appliance.control.plane import ControlPlane

router = APIRouter(tags=["status"])


@router.get("/status")
async def get_status(who: Principal = Viewer, plane: ControlPlane = Plane) -> dict[str, Any]:
    return await lanes.CONTROL.run(plane.status)  # never behind turns or execs (api/lanes.py)
