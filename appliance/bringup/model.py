"""The bring-up's data: a Step (what it does, its state, every command it would run, the fix
when blocked) and the Bringup (a host's steps and what they serve), as `--dry-run --json` prints
them.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

StepState = Literal["todo", "done", "blocked", "skip"]

GIB = 1024**3
CONTAINER_ENV = "APPLIANCE_INFERENCE__BACKEND"  # how --container reaches the supervisor
UNKNOWN = "recorded host: not probed"


class Step(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    title: str
    state: StepState
    why: str  # one line
    commands: list[list[str]] = Field(default_factory=list)  # every command it would run
    fix: str | None = None  # one line, when blocked


class Bringup(BaseModel):
    """What `appliance up` would do on this host (or a recorded one), step by step."""

    model_config = ConfigDict(extra="forbid")

    host: str  # the host class, as the snapshot names it
    recorded: bool  # a recorded host: every fact unknown
    path: Literal["host", "container"]  # where the backend runs
    backend: Literal["vllm", "embedded"]
    variant: str
    model: str
    target: str | None  # the appliance image's target (container path)
    image: str | None
    embedded_on_host: bool  # scripts/appliance-up.sh runs `setup.sh embedded` only then
    environment: str  # Podman/systemd, and the Quadlet alternative where it applies
    steps: list[Step]

    def step(self, step_id: str) -> Step | None:
        return next((s for s in self.steps if s.id == step_id), None)

    def blocked(self) -> list[Step]:
        return [s for s in self.steps if s.state == "blocked"]


@dataclass(frozen=True)
class Options:
    container: bool = False  # --container: inference.backend container for this run
    agent: bool = True  # False: APPLIANCE_NO_AGENT=1


def shell_line(argv: list[str]) -> str:
    return shlex.join(argv)


def appliance(*args: str) -> list[str]:
    return ["appliance", *args]
