"""/api/v1/operators: who may use the loopback port, with which role (admins only)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict

from appliance.control.api.deps import Admin, Plane, Principal
from appliance.control.operators import Role
from appliance.control.plane import ControlPlane

router = APIRouter(tags=["operators"])


class OperatorCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    role: Role


@router.get("/operators")
def list_operators(who: Principal = Admin, plane: ControlPlane = Plane) -> list[dict[str, Any]]:
    return [o.as_dict() for o in plane.operators.list()]


@router.post("/operators", status_code=201)
def create_operator(
    body: OperatorCreate, who: Principal = Admin, plane: ControlPlane = Plane
) -> dict[str, Any]:
    """The new operator and its token as `secret`: shown this once, stored only hashed."""
    operator, token = plane.operators.create(body.name, body.role, who.audit_fields())
    return {**operator.as_dict(), "secret": token}


@router.delete("/operators/{name}")
def revoke_operator(
    name: str, who: Principal = Admin, plane: ControlPlane = Plane
) -> dict[str, Any]:
    return plane.operators.revoke(name, who.audit_fields()).as_dict()
