"""/api/v1/spend: tokens and cost per key and per agent per UTC day over the last days (what the
console's Spend page charts), from the ledger's daily roll-up (appliance/ops/spend.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query

from appliance.control.api.deps import Plane, Principal, Viewer
from appliance.control.plane import ControlPlane
from appliance.ops import spend

router = APIRouter(tags=["spend"])

DAYS_MAX = 366


@router.get("/spend")
def spend_per_day(
    days: int = Query(spend.DAYS, ge=1, le=DAYS_MAX, description="UTC days up to today"),
    who: Principal = Viewer,
    plane: ControlPlane = Plane,
) -> dict[str, Any]:
    """{"days": [YYYY-MM-DD...], "rows": [one per key and day with usage: day, key, key_id,
    owner_kind, agent (null: no agent's key), prompt_tokens, completion_tokens, tokens, cost,
    requests], "totals": {...}}: settled usage only, as budgets count it."""
    return spend.report(plane.config.state_dir, plane.inference, days=days).as_dict()
