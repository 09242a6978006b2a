"""Agent runtimes: what a blueprint's `runtime.kind` means to the appliance, behind one protocol.

A runtime says how its sandbox is made (policy needs, the main command, the config files it
reads) and how one turn is driven: either through a long-lived service the sandbox's supervisor
keeps up (`service()`, `drive()`: OpenClaw's gateway, a `kind: command` with `serve:`; the
HTTP protocol is responses.py), or as a command run in the sandbox per turn (a runtime that
is also an `ExecTurns`: `turn()`, `read_turn()`). The appliance runs what it is told inside the
sandbox and never branches on the kind itself: a new runtime is one module and one entry in
RUNTIMES.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from blueprints.errors import BlueprintError
from blueprints.model import Blueprint
from sandbox.policy import Policy

if TYPE_CHECKING:
    import httpx

# In the agent's home: writable, persistent across upgrades (the home is the state volume).
WORKSPACE = "/home/agent/workspace"


@dataclass(frozen=True)
class Serving:
    """What the inference backend serves, for config that must fit it."""

    context_tokens: int  # the context the backend serves
    on_vllm: bool  # a GPU backend (room for long replies) rather than the embedded CPU model


@dataclass(frozen=True)
class Exec:
    """One command run in the sandbox as the agent (inside its Landlock domain)."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 120.0


@dataclass(frozen=True)
class Reply:
    """A turn's output as the runtime reports it."""

    ok: bool
    text: str
    usage: dict[str, Any] = field(default_factory=dict)
    session_id: str | None = None
    raw: dict[str, Any] | None = None  # the runtime's own JSON record, when it has one


@dataclass(frozen=True)
class Service:
    """A long-lived runtime: it listens on the sandbox's loopback `port` (the supervisor forwards
    the agent socket to it) and reads its per-agent token from the env var `token_env`."""

    port: int
    token_env: str
    ready_path: str = "/readyz"  # unauthenticated GET: 200 once the runtime takes turns


@dataclass(frozen=True)
class Delta:
    """Reply text as it streams."""

    text: str


@dataclass(frozen=True)
class ToolCall:
    """A tool call the runtime reports during a turn (`denied`: refused by its tool policy)."""

    name: str
    arguments: str = ""
    denied: bool = False


@dataclass(frozen=True)
class Finished:
    """The last event of every driven turn."""

    ok: bool
    text: str
    usage: dict[str, Any] = field(default_factory=dict)
    session_id: str | None = None
    raw: dict[str, Any] | None = None
    error: str | None = None


TurnEvent = Delta | ToolCall | Finished


class TurnStopped(Exception):
    """Raised by the HTTP client a drive() is handed when the turn must go no further: its
    client went away (the turn was interrupted), or the agent socket is not a socket. Not an
    HTTP error: drive() and its helpers let it through (no retry, no Finished); the caller
    records the turn."""


class AgentRuntime(Protocol):
    """One blueprint's runtime (built by `runtime_for`)."""

    blueprint: Blueprint
    workspace: str  # made in the agent's home, owned by the agent, before the first turn

    def policy(self) -> Policy:
        """The sandbox policy: the blueprint's, plus what the runtime needs."""
        ...

    def command(self) -> list[str]:
        """How the runtime starts: the sandbox's main command."""
        ...

    def agent_files(self, serving: Serving) -> dict[str, str] | None:
        """The rendered config files, mounted read-only in the sandbox (None: none)."""
        ...

    def service(self) -> Service | None:
        """The long-lived runtime the supervisor keeps up (None: turns are ExecTurns' execs,
        or there are none)."""
        ...

    def drive(
        self, http: httpx.Client, token: str, message: str, session: str
    ) -> Iterator[TurnEvent]:
        """One turn through the running runtime: Delta and ToolCall events as they come, then
        one Finished. `http` reaches the runtime's port (through the agent socket); closing
        the iterator early (the client went away) must cancel the turn in the runtime.
        TurnStopped from `http` is let through."""
        ...


@runtime_checkable
class ExecTurns(Protocol):
    """A runtime without a service that takes its turns as a command run in the sandbox."""

    def turn(self, message: str, session: str) -> Exec | None:
        """How one turn in `session` is run (None: this runtime takes no turns)."""
        ...

    def read_turn(self, exit_code: int, stdout: bytes, stderr: bytes) -> Reply:
        """The turn's reply, from what its command printed."""
        ...


def _openclaw(bp: Blueprint) -> AgentRuntime:
    from blueprints.runtimes.openclaw import OpenClawRuntime

    return OpenClawRuntime(bp)


def _command(bp: Blueprint) -> AgentRuntime:
    from blueprints.runtimes.command import CommandRuntime

    return CommandRuntime(bp)


RUNTIMES: dict[str, Callable[[Blueprint], AgentRuntime]] = {
    "openclaw": _openclaw,
    "command": _command,
}


def runtime_for(bp: Blueprint) -> AgentRuntime:
    try:
        make = RUNTIMES[bp.runtime.kind]
    except KeyError:
        raise BlueprintError(f"{bp.ref}: no runtime {bp.runtime.kind!r}") from None
    return make(bp)
