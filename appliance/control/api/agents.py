"""/api/v1/agents: list, create, a turn, stop, start, upgrade, rollback, rm, transcript (thin:
the logic is AgentService's, appliance/control/agents.py, and TurnService's, turns.py). A
create, upgrade or turn can take minutes (an image build, a real model's turn): clients wait
with a long timeout. A turn is answered whole (its done record) or, with `stream: true`, as
NDJSON: one event per line as the runtime produces it, the done record last. A refused turn is
a 409 (`turn_refused`) before any byte of a stream. Either way, a client that disconnects before
the turn ends cancels it in the runtime at once, and it is recorded cancelled."""

from __future__ import annotations

import json
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, Field, field_validator, model_validator
from starlette.types import Receive, Scope, Send

from appliance.control.agents import blueprint_source
from appliance.control.api import lanes
from appliance.control.api.deps import Operator, Plane, Principal, Viewer
from appliance.control.plane import ControlPlane
from blueprints.resolve import is_path_ref

router = APIRouter(tags=["agents"])

MESSAGE_MAX = 100_000  # one argv string inside the sandbox (the kernel caps one at 128 KiB)
REF_MAX = 255  # NAME[@VERSION]
BLUEPRINT_MAX = 1 << 20  # a blueprint is a few KiB of YAML
NOT_A_PATH = "NAME[@VERSION] is a catalog reference, not a path: send a file as blueprint_yaml"


def _reference(ref: str | None) -> str | None:
    """Never a host path: the control plane (root) opens no file a caller names (422)."""
    if ref is not None and is_path_ref(ref):
        raise ValueError(NOT_A_PATH)
    return ref


class BlueprintText(BaseModel):
    """A blueprint file as the CLI read it (as the operator): its YAML text, and its name."""

    blueprint_yaml: str | None = Field(
        None, max_length=BLUEPRINT_MAX, description="A blueprint file's YAML text."
    )
    source: str = Field("<blueprint>", max_length=4096, description="Its file name, for errors.")


class NewAgent(BlueprintText):
    name: str = Field(max_length=255)
    blueprint: str | None = Field(
        None, max_length=REF_MAX, description="NAME[@VERSION] (or send blueprint_yaml)."
    )

    _ref = field_validator("blueprint")(_reference)

    @model_validator(mode="after")
    def _one_source(self) -> NewAgent:
        if (self.blueprint is None) == (self.blueprint_yaml is None):
            raise ValueError("give one of blueprint (NAME[@VERSION]) or blueprint_yaml")
        return self


class TurnRequest(BaseModel):
    message: str = Field(max_length=MESSAGE_MAX)
    session: str | None = Field(None, max_length=64, description="Continue this session.")
    stream: bool = Field(False, description="Answer with NDJSON events as the turn runs.")


class UpgradeRequest(BlueprintText):
    version: str | None = Field(
        None, max_length=REF_MAX, description="VERSION or NAME@VERSION; default the newest."
    )

    _ref = field_validator("version")(_reference)

    @model_validator(mode="after")
    def _one_source(self) -> UpgradeRequest:
        if self.version is not None and self.blueprint_yaml is not None:
            raise ValueError("give one of version or blueprint_yaml")
        return self


@router.get("/agents")
def list_agents(who: Principal = Viewer, plane: ControlPlane = Plane) -> list[dict[str, Any]]:
    return plane.agents.list()


@router.post("/agents", status_code=201)
def create_agent(
    body: NewAgent, who: Principal = Operator, plane: ControlPlane = Plane
) -> dict[str, Any]:
    source = blueprint_source(body.blueprint, body.blueprint_yaml, body.source)
    assert source is not None  # NewAgent requires one
    return plane.agents.create(who, body.name, source)


class TurnStream(StreamingResponse):
    """A turn's events as NDJSON lines. However the response ends (the client went away: the
    server cancels it), the turn's events are closed: the turn is cancelled and recorded so.
    A disconnect interrupts the turn at once, even while its runtime sends nothing."""

    media_type = "application/x-ndjson"

    def __init__(self, events: lanes.LaneStream[dict[str, Any]]) -> None:
        self.events = events
        super().__init__(_lines(events), headers={"Cache-Control": "no-store"})

    async def listen_for_disconnect(self, receive: Receive) -> None:
        await super().listen_for_disconnect(receive)
        self.events.interrupt()  # a turn waiting on a silent runtime stops waiting now

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.events.aclose()


async def _lines(events: lanes.LaneStream[dict[str, Any]]) -> Any:
    async for event in events:
        yield json.dumps(event) + "\n"


async def _whole(request: Request, events: lanes.LaneStream[dict[str, Any]]) -> dict[str, Any]:
    """The turn's done record. The client gone first: the turn is interrupted (as a stream's
    is), so it ends at once, recorded cancelled; its slot is given back either way."""

    async def interrupt_on_disconnect() -> None:
        # The body was read: what the server receives next is the disconnect.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        events.interrupt()

    done: dict[str, Any] | None = None
    try:
        async with anyio.create_task_group() as watching:
            watching.start_soon(interrupt_on_disconnect)
            async for event in events:
                if event["type"] == "done":
                    done = event
            watching.cancel_scope.cancel()
    finally:
        await events.aclose()
    if done is None:
        raise AssertionError("a turn's events end with done")  # TurnService._events yields it
    return done


@router.post("/agents/{name}/turns", response_model=None)
async def run_turn(
    request: Request,
    name: str,
    body: TurnRequest,
    who: Principal = Operator,
    plane: ControlPlane = Plane,
) -> dict[str, Any] | Response:
    """A turn runs on its own lane (api/lanes.py): 429 when all its slots are taken; it holds
    its slot until it ends (a stream: until the stream does)."""
    events = await lanes.TURNS.open(plane.turns.start, who, name, body.message, body.session)
    if not body.stream:
        return await _whole(request, events)
    return TurnStream(events)


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
    to = blueprint_source(body.version, body.blueprint_yaml, body.source)
    return plane.agents.upgrade(who, name, to)


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
    return plane.turns.transcript(name)
