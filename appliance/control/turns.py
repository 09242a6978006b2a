"""Agent turns through the control plane: gated, driven, streamed, recorded (the plane's `turns`).

A turn is refused before it starts (TurnRefused, with the reason) when the kill switch holds, the
agent's sandbox is not running, its key has spent its daily budget, or its long-lived runtime is
not running. A runtime with a service (blueprints/runtimes `service()`) is driven over the agent
socket its sandbox's supervisor forwards to the runtime's loopback port; one without runs its
`turn()` command in the sandbox (one delta, then done). Each turn, refused ones too, ends in one
line of the host transcript (transcript.py) and one `agent.turn` audit record: trigger, actor,
reply, tool calls (as the runtime reports them: the agent may have rewritten what they are read
from, see blueprints/runtimes/openclaw.py), duration, and the tokens and model time of the agent
key's ledger rows during the turn (`tokens.overlapping`: another turn of the agent ran at the
same time, and each counts the other's rows too). A denied tool call is an `agent.tool_denied`
alarm. Closing a turn's events early (the client went away) before it finished closes the
runtime's stream, which cancels the turn in the runtime, and the turn is recorded as cancelled.

No store connection or Podman client is held from one event to the next: the API fetches each
event on a lane thread, not always the same one, and SQLite connections belong to their thread.
A turn takes no lock: `agent stop` and the kill switch act at once and cut it off.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import httpx

from appliance.control.agent_manager import AgentError, AgentManager
from appliance.control.notices import turn_notices
from appliance.control.transcript import TranscriptLog
from appliance.control.turn_events import (
    CLIENT_GONE,
    AgentSocketTransport,
    Outcome,
    TurnEvents,
)
from appliance.errors import OPERATOR_ERRORS, ConfigError, TurnRefused
from appliance.store import open_store
from appliance.store.agent_store import AgentStore
from blueprints.runtimes import (
    AgentRuntime,
    Delta,
    Exec,
    ExecTurns,
    Finished,
    Service,
    ToolCall,
    TurnStopped,
    runtime_for,
)
from sandbox.names import SANDBOX_KEY_PREFIX, check_name

if TYPE_CHECKING:
    from appliance.control.api.deps import Principal
    from appliance.control.plane import ControlPlane
    from sandbox.lifecycle.manager import SandboxManager

log = logging.getLogger(__name__)

Trigger = Literal["manual", "schedule"]
TRIGGERS: tuple[str, ...] = ("manual", "schedule")
# Who acts when no client does (a schedule): the control plane itself.
CONTROL_PLANE_ACTOR: dict[str, Any] = {"actor": "control-plane", "actor_kind": "internal"}
SESSION = re.compile(r"[a-z0-9][a-z0-9-]{0,39}")
CONNECT_TIMEOUT_S = 10.0
SETTLE_WAIT_S = 2.0  # the gateway settles a request's ledger row just after its last byte
ARGUMENTS_MAX = 4096  # characters of a tool call's arguments kept in the transcript
# What the transcript keeps of the runtime's own record of the turn (the whole response, up to
# 1 MiB, is the reply again); the last is the appliance's note that tool calls went unread.
RAW_KEPT = ("id", "status", "usage", "appliance_tool_calls_error")


@dataclass(eq=False)  # one object per turn (TurnService._active holds them)
class _Turn:
    """One turn being driven: what was asked, by whom, and how to reach the runtime."""

    name: str
    message: str
    session: str
    trigger: str
    actor: dict[str, Any]
    runtime: AgentRuntime
    service: Service | None
    command: Exec | None  # the exec turn of a runtime without a service
    ts: float = field(default_factory=time.time)
    t0: float = field(default_factory=time.monotonic)
    key_id: str | None = None
    transport: AgentSocketTransport | None = None  # to the runtime's service
    token: str | None = None
    overlapping: bool = False  # another turn of the agent ran while this one did


class TurnService:
    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane
        self.config = plane.config
        self.transcripts = TranscriptLog(plane.config.state_dir)
        # Turns running now, per agent: whose ledger rows a turn's token window also holds.
        self._active: dict[str, list[_Turn]] = {}
        self._active_lock = threading.Lock()

    # -- the API -----------------------------------------------------------------------------

    def gate(self, name: str) -> None:
        """NotFoundError for an unknown agent; TurnRefused (with the reason) when a turn would
        be refused now. Records nothing: a refused turn is recorded by `start`."""
        check_name(name, "agent")
        with self._agents() as m:
            runtime = runtime_for(m.deployed(m.current(name)))
            self._gate(m.sandboxes, name, runtime.service())

    def start(
        self,
        who: Principal | None,
        name: str,
        message: str,
        session: str | None = None,
        trigger: Trigger = "manual",
    ) -> Iterator[dict[str, Any]]:
        """A turn, checked and gated now: TurnRefused, NotFoundError or ConfigError raised
        before any event (the refusal recorded), so the API answers a refusal as an error before
        the first byte of a stream. Then its events: {"type": "delta", "text"}, {"type": "tool",
        "name", "arguments", "denied"}, and one {"type": "done", ...the transcript record}.
        `who` None: the control plane acts (a schedule)."""
        turn = self._begin(who, name, message, session, trigger)
        interrupt = turn.transport.interrupt if turn.transport is not None else None
        return TurnEvents(self._events(turn), interrupt, lambda: self._never_started(turn))

    def interrupt(self, names: list[str], reason: str) -> int:
        """Cut the turns the named agents are driving now (the kill switch, `agent stop`/`rm`):
        each stops waiting for its runtime at once and ends cancelled, saying `reason`. Thread-
        safe; the number of turns cut (an exec turn ends with its container)."""
        with self._active_lock:
            turns = [t for n in names for t in self._active.get(n, [])]
        for turn in turns:
            if turn.transport is not None:
                turn.transport.interrupt(reason)
        return sum(t.transport is not None for t in turns)

    def transcript(self, name: str) -> list[dict[str, Any]]:
        return self.transcripts.read(name)

    def running(self, name: str) -> int:
        """How many turns `name` is running now (gone before its transcript line is written)."""
        with self._active_lock:
            return len(self._active.get(name, []))

    # -- begin: checks and the gate ------------------------------------------------------------

    def _begin(
        self, who: Principal | None, name: str, message: str, session: str | None, trigger: str
    ) -> _Turn:
        check_name(name, "agent")
        if trigger not in TRIGGERS:
            raise ConfigError(f"trigger {trigger!r}: one of {', '.join(TRIGGERS)}")
        session = session or f"run-{secrets.token_hex(4)}"
        if not SESSION.fullmatch(session):
            raise ConfigError(f"session {session!r}: use 1-40 of a-z, 0-9 and '-'")
        actor = who.audit_fields() if who is not None else dict(CONTROL_PLANE_ACTOR)
        with self._agents(actor) as m:
            dep = m.current(name)
            runtime = runtime_for(m.deployed(dep))
            service = runtime.service()
            command = None
            if service is None and isinstance(runtime, ExecTurns):
                command = runtime.turn(message, session)
            if service is None and command is None:
                raise AgentError(
                    f"{name} runs a plain command ({dep.ref}); it takes no turns",
                    hint=f"`appliance sandbox exec {name} -- CMD`",
                )
            turn = _Turn(name, message, session, trigger, actor, runtime, service, command)
            try:
                turn.key_id = self._gate(m.sandboxes, name, service)
            except TurnRefused as refused:
                self._record_refusal(turn, refused)
                raise
            if service is not None:
                turn.transport = AgentSocketTransport(m.sandboxes.agent_socket(name))
                turn.token = m.sandboxes.runtime_token(name)
        self._enter(turn)
        return turn

    def _enter(self, turn: _Turn) -> None:
        with self._active_lock:
            others = self._active.setdefault(turn.name, [])
            for other in others:
                other.overlapping = True
            turn.overlapping = bool(others)
            others.append(turn)

    def _leave(self, turn: _Turn) -> None:
        with self._active_lock:
            others = self._active.get(turn.name, [])
            if turn in others:
                others.remove(turn)
            if not others:
                self._active.pop(turn.name, None)

    def _gate(self, sandboxes: SandboxManager, name: str, service: Service | None) -> str | None:
        """The agent's key id, or TurnRefused with the first reason that applies."""
        if (held := sandboxes.boxes.held()) is not None:
            raise TurnRefused(
                f"{name}: the kill switch holds every sandbox ({held})",
                hint="`appliance release` lifts the hold",
            )
        record = sandboxes.boxes.get(name)
        if record is None or record.state != "running":
            state = record.state if record is not None else "missing"
            raise TurnRefused(f"{name} is {state}", hint=f"`appliance agent start {name}`")
        if record.key_id is not None:
            self._budget_gate(name, record.key_id)
        # Every agent's main process is kept up and fails closed (an exec-turn one's too): a
        # turn is refused while it is not running, whichever way turns reach it.
        if service is not None or sandboxes.has_service(name):
            runtime = sandboxes.runtime_state(name) or {}
            state = runtime.get("state") or "not reported yet"
            if state != "running":
                why = f": {runtime['reason']}" if runtime.get("reason") else ""
                raise TurnRefused(
                    f"{name}'s runtime is {state}{why}", hint=f"`appliance agent logs {name}`"
                )
        if service is not None and not sandboxes.runtime_token(name):
            raise TurnRefused(
                f"{name}'s runtime has no token on the host",
                hint=f"re-create it: `appliance agent rm {name}` and `agent create`",
            )
        return record.key_id

    def _budget_gate(self, name: str, key_id: str) -> None:
        """The daily limits of the agent's key against what it spent today (the gateway refuses
        the model call too; refusing here starts no turn that cannot get an answer)."""
        inference = self.plane.inference
        budget = inference.get_budget(key_id)
        if budget is None or (budget.daily_tokens is None and budget.daily_cost is None):
            return
        spend = inference.spend(key_id)
        over = None
        if budget.daily_tokens is not None and spend.day_tokens >= budget.daily_tokens:
            over = f"{spend.day_tokens} of {budget.daily_tokens} tokens"
        elif budget.daily_cost is not None and spend.day_cost >= budget.daily_cost:
            over = f"{spend.day_cost:g} of {budget.daily_cost:g} cost"
        if over is not None:
            raise TurnRefused(
                f"{name} is over its daily budget: {over}",
                hint=f"wait for 00:00 UTC, or raise it: `appliance budget set "
                f"{SANDBOX_KEY_PREFIX}{name} --daily-tokens N`",
            )

    # -- the events ----------------------------------------------------------------------------

    def _events(self, turn: _Turn) -> Iterator[dict[str, Any]]:
        outcome = Outcome()
        try:
            if turn.service is not None:
                yield from self._driven(turn, outcome)
            else:
                yield from self._executed(turn, outcome)
            if not outcome.finished and outcome.error is None:
                outcome.error = "the runtime's stream ended without a result"
        except GeneratorExit:  # closed early: the client went away
            if not outcome.finished:  # (a turn that had finished stands as it ended)
                outcome.cancel(turn.transport.reason if turn.transport else CLIENT_GONE)
            self._record(turn, outcome)
            raise
        except (*OPERATOR_ERRORS, TurnStopped, httpx.HTTPError, OSError) as exc:
            outcome.fail(exc)
        except Exception as exc:  # recorded as a failed turn all the same
            log.exception("turn of %s failed", turn.name)
            outcome.fail(exc)
        if turn.transport is not None and turn.transport.interrupted and not outcome.finished:
            outcome.cancel(turn.transport.reason)  # cut while the runtime was silent
        yield {"type": "done", **self._record(turn, outcome)}

    def _driven(self, turn: _Turn, outcome: Outcome) -> Iterator[dict[str, Any]]:
        """Through the runtime's service, over the agent socket; closing this closes the
        runtime's request (drive cancels the turn in the runtime)."""
        assert turn.transport is not None and turn.token is not None  # set by _begin
        read_s = turn.runtime.blueprint.inference.timeout_s  # the model may be silent this long
        http = httpx.Client(
            transport=turn.transport,
            base_url="http://agent",
            timeout=httpx.Timeout(read_s, connect=CONNECT_TIMEOUT_S),
        )
        with http, closing(turn.runtime.drive(http, turn.token, turn.message, turn.session)) as it:
            for event in it:
                if isinstance(event, Delta):
                    outcome.parts.append(event.text)
                    yield {"type": "delta", "text": event.text}
                elif isinstance(event, ToolCall):
                    call = {
                        "name": event.name,
                        "arguments": event.arguments[:ARGUMENTS_MAX],
                        "denied": event.denied,
                    }
                    outcome.tool_calls.append(call)
                    if event.denied:
                        self._audit(turn, "agent.tool_denied", tool=event.name)
                    yield {"type": "tool", **call}
                # A failure after an interrupt is the interrupt's (the connection cut): the turn
                # is cancelled. An answer the runtime completed stands.
                elif isinstance(event, Finished) and (event.ok or not turn.transport.interrupted):
                    outcome.finish(event)

    def _executed(self, turn: _Turn, outcome: Outcome) -> Iterator[dict[str, Any]]:
        """The runtime's turn command, run in the sandbox as the agent: its reply is one delta
        (only when it answered)."""
        command, runtime = turn.command, turn.runtime
        assert command is not None and isinstance(runtime, ExecTurns)  # as _begin set them
        with self.plane.sandboxes.manager() as sandboxes:
            code, out, err = sandboxes.exec(
                turn.name, command.argv, env=command.env, timeout_s=command.timeout_s
            )
        outcome.replied(runtime.read_turn(code, out, err), code, err)
        if outcome.ok and outcome.text:
            outcome.parts.append(outcome.text)
            yield {"type": "delta", "text": outcome.text}

    # -- the record ------------------------------------------------------------------------------

    def _record(self, turn: _Turn, outcome: Outcome) -> dict[str, Any]:
        """Transcript line, activity count, key use and `agent.turn`; the done record (with
        the exec's stderr tail, which the transcript does not keep)."""
        try:
            tokens = self._tokens(turn)
        finally:
            self._leave(turn)  # after its token window closed: a turn now is no overlap
        record = {
            "agent": turn.name,
            "ok": outcome.ok,
            "reply": outcome.reply,
            "exit_code": outcome.exit_code,
            "duration_s": round(time.monotonic() - turn.t0, 3),
            "usage": outcome.usage,
            "session": turn.session,
            "session_id": outcome.session_id,
            "raw": _raw_kept(outcome.raw),
            "trigger": turn.trigger,
            "actor": turn.actor.get("actor"),
            "actor_kind": turn.actor.get("actor_kind"),
            "tokens": {**tokens, "overlapping": turn.overlapping},
            "tool_calls": outcome.tool_calls,
            "notices": self._notices(turn),
            "cancelled": outcome.cancelled,
            "error": outcome.error,
        }
        self.transcripts.append(turn.name, {"ts": turn.ts, "message": turn.message, **record})
        with open_store(self.config.state_dir) as db:
            AgentStore(db).record_turn(turn.name)  # the inventory's turns and last activity
        self._audit_key_use(turn)
        self._audit(
            turn,
            "agent.turn",
            ok=outcome.ok,
            exit_code=outcome.exit_code,
            duration_s=record["duration_s"],
            usage=outcome.usage,
            session_id=outcome.session_id,
            tokens=record["tokens"],
            tool_calls=len(outcome.tool_calls),
            cancelled=outcome.cancelled,
            error=outcome.error,
        )
        return {**record, "stderr_tail": outcome.stderr_tail}

    def _notices(self, turn: _Turn) -> list[str]:
        """What the reply comes with: e.g. that the embedded demonstration model answered."""
        bp = turn.runtime.blueprint
        # Which runtimes send the model tools: OpenClaw's (a `kind: command` one sends none).
        return turn_notices(self.config, bp.inference.model, tools=bp.runtime.kind == "openclaw")

    def _never_started(self, turn: _Turn) -> None:
        """Gated, then closed before it ran (the client went at once): cancelled all the same."""
        if turn.transport is not None:
            turn.transport.close()
        outcome = Outcome()
        outcome.cancel()
        self._record(turn, outcome)

    def _record_refusal(self, turn: _Turn, refused: TurnRefused) -> None:
        reason = str(refused)
        line = {
            "ts": turn.ts,
            "message": turn.message,
            "agent": turn.name,
            "ok": False,
            "reply": "",
            "exit_code": None,
            "duration_s": 0.0,
            "session": turn.session,
            "trigger": turn.trigger,
            "actor": turn.actor.get("actor"),
            "actor_kind": turn.actor.get("actor_kind"),
            "tool_calls": [],
            "refused": reason,
        }
        self.transcripts.append(turn.name, line)
        self._audit(turn, "agent.turn", ok=False, refused=reason)

    def _tokens(self, turn: _Turn) -> dict[str, Any]:
        """The agent key's ledger rows admitted during the turn: tokens and model time (waiting
        a moment for rows the gateway has not settled yet). The rows are the key's, not the
        turn's: when another turn of the agent ran meanwhile (`turn.overlapping`), both count
        each other's rows."""
        used = {"prompt_tokens": 0, "completion_tokens": 0, "latency_s": 0.0, "requests": 0}
        if turn.key_id is not None:
            deadline = time.monotonic() + SETTLE_WAIT_S
            while True:
                used = self.plane.inference.usage_between(turn.key_id, turn.ts, time.time())
                if not used["open"] or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        return {
            "prompt": int(used["prompt_tokens"]),
            "completion": int(used["completion_tokens"]),
            "total": int(used["prompt_tokens"] + used["completion_tokens"]),
            "model_time_s": round(float(used["latency_s"]), 3),
            "requests": int(used["requests"]),
        }

    def _audit_key_use(self, turn: _Turn) -> None:
        """A key use summary after each turn: what the agent's key has spent today and this
        month (the ledger has every request; this is the line an auditor reads)."""
        if turn.key_id is None:
            return
        spend = self.plane.inference.spend(turn.key_id)
        self.plane.inference.audit(
            "key.usage",
            key_id=turn.key_id,
            key_name=SANDBOX_KEY_PREFIX + turn.name,
            day_tokens=spend.day_tokens,
            month_tokens=spend.month_tokens,
            day_cost=spend.day_cost,
            month_cost=spend.month_cost,
        )

    def _audit(self, turn: _Turn, event: str, **fields: Any) -> None:
        self.plane.inference.audit(
            event,
            agent=turn.name,
            trigger=turn.trigger,
            session=turn.session,
            **fields,
            **turn.actor,
        )

    @contextmanager
    def _agents(self, actor: dict[str, Any] | None = None) -> Iterator[AgentManager]:
        """An AgentManager on its own store connection, for this thread and this step."""
        with self.plane.sandboxes.manager() as sandboxes, open_store(self.config.state_dir) as db:
            yield AgentManager(self.config, db, sandboxes, actor)


def _raw_kept(raw: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the record keeps of the runtime's own record of the turn (RAW_KEPT)."""
    return None if raw is None else {k: raw[k] for k in RAW_KEPT if k in raw}
