"""/api/v1/kill and /api/v1/release: the kill switch (appliance/control/killswitch.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from appliance.control.api import lanes
from appliance.control.api.deps import Operator, Plane, Principal
from appliance.control.plane import ControlPlane

router = APIRouter(tags=["kill switch"])


class Kill(BaseModel):
    all: bool = False
    names: list[str] = Field(default_factory=list)
    hold: bool = False
    reason: str = Field("operator kill switch", max_length=1000)


# Both run on the control lane (api/lanes.py): never behind agent turns, sandbox execs or the
# shared pool's sync routes. The service is looked up there too: its first use builds it, under
# the plane's build lock, which must not be waited for on the event loop.
@router.post("/kill")
async def kill(
    body: Kill, who: Principal = Operator, plane: ControlPlane = Plane
) -> dict[str, Any]:
    def pull() -> dict[str, Any]:
        return plane.kill_switch.kill(who, body.names, body.all, body.hold, body.reason)

    return await lanes.CONTROL.run(pull)


@router.post("/release")
async def release(who: Principal = Operator, plane: ControlPlane = Plane) -> dict[str, Any]:
    return await lanes.CONTROL.run(lambda: plane.kill_switch.release(who))
