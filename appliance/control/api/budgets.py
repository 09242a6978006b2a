"""/api/v1/budgets: each key's daily and monthly limits (tokens, cost) and its spend."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from appliance.control.api.deps import Operator, Plane, Principal, Viewer
from appliance.control.plane import ControlPlane

router = APIRouter(tags=["budgets"])


class BudgetLimits(BaseModel):
    """The limits to set; one left out (or null) keeps its value unless `clear`."""

    model_config = ConfigDict(extra="forbid")
    daily_tokens: int | None = Field(default=None, ge=0)
    monthly_tokens: int | None = Field(default=None, ge=0)  # a hard stop
    daily_cost: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    monthly_cost: float | None = Field(default=None, ge=0, allow_inf_nan=False)  # a hard stop
    clear: bool = False  # drop every limit first


@router.get("/budgets")
def list_budgets(
    key: str | None = None, who: Principal = Viewer, plane: ControlPlane = Plane
) -> list[dict[str, Any]]:
    """Every live key's limits, spend today and this month (UTC), reservations and state."""
    return plane.keys.budgets(key)


@router.put("/budgets/{key}")
def set_budget(
    key: str, body: BudgetLimits, who: Principal = Operator, plane: ControlPlane = Plane
) -> dict[str, Any]:
    limits = body.model_dump(exclude={"clear"})
    return plane.keys.set_budget(key, limits, body.clear, who.audit_fields())
