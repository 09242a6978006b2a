"""/api/v1/sandboxes: create, list, policy, stop, start, rm, reconcile, logs, exec (thin: the
logic is SandboxService's, appliance/control/sandboxes.py)."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from appliance.control.api import lanes
from appliance.control.api.deps import Operator, Plane, Principal, Viewer
from appliance.control.plane import ControlPlane
from appliance.control.sandboxes import LOGS_TAIL, LOGS_TAIL_MAX
from appliance.errors import ConfigError

router = APIRouter(tags=["sandboxes"])

POLICY_MAX = 1 << 20  # a policy is a few KiB of YAML
STDIN_MAX = 64 << 20  # base64 of what `sandbox exec` feeds the command


class NewSandbox(BaseModel):
    name: str = Field(max_length=255)
    policy: str = Field(max_length=POLICY_MAX, description="The policy file's YAML text.")
    source: str = Field("<policy>", max_length=4096, description="Its file name, for errors.")
    command: list[str] | None = None
    image: str | None = Field(None, max_length=1024)


class PolicyText(BaseModel):
    policy: str = Field(max_length=POLICY_MAX)
    source: str = Field("<policy>", max_length=4096)


class ExecRequest(BaseModel):
    argv: list[str] = Field(min_length=1)
    stdin: str = Field("", max_length=STDIN_MAX, description="base64 of the command's stdin")


@router.get("/sandboxes")
def list_sandboxes(who: Principal = Viewer, plane: ControlPlane = Plane) -> list[dict[str, Any]]:
    return plane.sandboxes.list()


@router.post("/sandboxes", status_code=201)
def create_sandbox(
    body: NewSandbox, who: Principal = Operator, plane: ControlPlane = Plane
) -> dict[str, Any]:
    return plane.sandboxes.create(
        who, body.name, body.policy, body.source, body.command, body.image
    )


@router.post("/sandboxes/reconcile")
def reconcile(who: Principal = Operator, plane: ControlPlane = Plane) -> dict[str, list[str]]:
    return plane.sandboxes.reconcile(who)


@router.get("/sandboxes/{name}")
def get_sandbox(name: str, who: Principal = Viewer, plane: ControlPlane = Plane) -> dict[str, Any]:
    return plane.sandboxes.get(name)


@router.get("/sandboxes/{name}/policy")
def get_policy(name: str, who: Principal = Viewer, plane: ControlPlane = Plane) -> dict[str, Any]:
    return plane.sandboxes.policy(name)


@router.put("/sandboxes/{name}/policy")
def set_policy(
    name: str, body: PolicyText, who: Principal = Operator, plane: ControlPlane = Plane
) -> dict[str, int]:
    return {"rev": plane.sandboxes.set_policy(who, name, body.policy, body.source)}


@router.post("/sandboxes/{name}/stop")
def stop(name: str, who: Principal = Operator, plane: ControlPlane = Plane) -> dict[str, Any]:
    return plane.sandboxes.stop(who, name)


@router.post("/sandboxes/{name}/start")
def start(name: str, who: Principal = Operator, plane: ControlPlane = Plane) -> dict[str, Any]:
    return plane.sandboxes.start(who, name)


@router.delete("/sandboxes/{name}")
def remove(
    name: str, keep_home: bool = False, who: Principal = Operator, plane: ControlPlane = Plane
) -> dict[str, Any]:
    return plane.sandboxes.remove(who, name, keep_home)


@router.get("/sandboxes/{name}/logs")
def logs(
    name: str,
    tail: int = Query(LOGS_TAIL, ge=0, le=LOGS_TAIL_MAX, description="The last N lines."),
    who: Principal = Viewer,
    plane: ControlPlane = Plane,
) -> dict[str, str]:
    return {"name": name, "logs": plane.sandboxes.logs(name, tail)}


@router.post("/sandboxes/{name}/exec")
async def exec_(
    name: str, body: ExecRequest, who: Principal = Operator, plane: ControlPlane = Plane
) -> dict[str, Any]:
    """Run argv as the agent with `stdin` (base64) fed whole; stdout/stderr come back base64,
    each capped (`truncated`). On its own lane (api/lanes.py): 429 when all its slots are taken."""
    try:
        stdin = base64.b64decode(body.stdin, validate=True)
    except binascii.Error:
        raise ConfigError("stdin: not base64") from None
    return await lanes.EXECS.run(plane.sandboxes.exec, name, body.argv, stdin)
