"""/api/v1/agents/{name}/schedule: an agent's blueprint schedule entries with their next and last
runs (thin: ScheduleService, appliance/control/schedules.py; the scheduler itself is a thread of
the plane, appliance/control/scheduler.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from appliance.control.api.deps import Plane, Principal, Viewer
from appliance.control.plane import ControlPlane

router = APIRouter(tags=["schedules"])


@router.get("/agents/{name}/schedule")
def schedule(
    name: str, who: Principal = Viewer, plane: ControlPlane = Plane
) -> list[dict[str, Any]]:
    """Each entry (every|cron, tz, active_hours, prompt, session) with next_run_at, last_run_at
    (epoch seconds), last_outcome (running|ok|failed|cancelled|interrupted), last_reason, its
    last skip (last_skip_at, last_skip_reason), and its run and skip counts."""
    return plane.schedules.view(name)
