"""/api/v1/agents: list, create, a turn, stop, start, upgrade, rollback, rm, transcript (thin:
the logic is AgentService's, appliance/control/agents.py). A create, upgrade or turn can take
minutes (an image build, a real model's turn): clients wait with a long timeout."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from appliance.control.api.deps import Operator, Plane, Principal, Viewer
from appliance.control.plane import ControlPlane

router = APIRouter(tags=["agents"])

MESSAGE_MAX = 100_000  # one argv string inside the sandbox (the kernel caps one at 128 KiB)
REF_MAX = 4096  # NAME[@VERSION] or an absolute blueprint.yaml path


class NewAgent(BaseModel):
    name: str = Field(max_length=255)
    blueprint: str = Field(
        max_length=REF_MAX, description="NAME[@VERSION], or an absolute blueprint.yaml path."
    )


class TurnRequest(BaseModel):
    message: str = Field(max_length=MESSAGE_MAX)
    session: str | None = Field(None, max_length=64, description="Continue this session.")


class UpgradeRequest(BaseModel):
    version: str | None = Field(
        None, max_length=REF_MAX, description="VERSION, NAME@VERSION or a path; default newest."
    )


@router.get("/agents")
def list_agents(who: Principal = Viewer, plane: ControlPlane = Plane) -> list[dict[str, Any]]:
    return plane.agents.list()


@router.post("/agents", status_code=201)
def create_agent(
    body: NewAgent, who: Principal = Operator, plane: ControlPlane = Plane
) -> dict[str, Any]:
    return plane.agents.create(who, body.name, body.blueprint)


@router.post("/agents/{name}/turns")
def run_turn(
    name: str, body: TurnRequest, who: Principal = Operator, plane: ControlPlane = Plane
) -> dict[str, Any]:
    return plane.agents.run(who, name, body.message, body.session)


@router.post("/agents/{name}/stop")
def stop_agent(name: str, who: Principal = Operator, plane: ControlPlane = Plane) -> dict[str, Any]:
    return plane.agents.stop(who, name)


@router.post("/agents/{name}/start")
def start_agent(
    name: str, who: Principal = Operator, plane: ControlPlane = Plane
) -> dict[str, Any]:
    return plane.agents.start(who, name)


@router.post("/agents/{name}/upgrade")
def upgrade_agent(
    name: str, body: UpgradeRequest, who: Principal = Operator, plane: ControlPlane = Plane
) -> dict[str, Any]:
    return plane.agents.upgrade(who, name, body.version)


@router.post("/agents/{name}/rollback")
def rollback_agent(
    name: str, who: Principal = Operator, plane: ControlPlane = Plane
) -> dict[str, Any]:
    return plane.agents.rollback(who, name)


@router.delete("/agents/{name}")
def remove_agent(
    name: str, who: Principal = Operator, plane: ControlPlane = Plane
) -> dict[str, Any]:
    return plane.agents.remove(who, name)


@router.get("/agents/{name}/transcript")
def transcript(
    name: str, who: Principal = Operator, plane: ControlPlane = Plane
) -> list[dict[str, Any]]:
    return plane.agents.transcript(name)
