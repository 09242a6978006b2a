"""/api/v1/keys: inference.local's API keys (admins only); the secret is in the create answer
only."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict

from appliance.control.api.deps import Admin, Plane, Principal
from appliance.control.plane import ControlPlane

router = APIRouter(tags=["keys"])


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    owner_kind: Literal["client", "sandbox"] = "client"
    allowed_models: list[str] | None = None  # null: any model
    scopes: list[str] = []


@router.get("/keys")
def list_keys(who: Principal = Admin, plane: ControlPlane = Plane) -> list[dict[str, Any]]:
    return plane.keys.list()


@router.post("/keys", status_code=201)
def create_key(
    body: KeyCreate, who: Principal = Admin, plane: ControlPlane = Plane
) -> dict[str, Any]:
    """The key with its `secret` (this once) and `warnings` (models not served here)."""
    return plane.keys.create(
        body.name, body.owner_kind, body.allowed_models, body.scopes, who.audit_fields()
    )


@router.delete("/keys/{name_or_id}")
def revoke_key(
    name_or_id: str, who: Principal = Admin, plane: ControlPlane = Plane
) -> dict[str, Any]:
    return plane.keys.revoke(name_or_id, who.audit_fields())
