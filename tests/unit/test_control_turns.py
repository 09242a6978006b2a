"""Turns through the control plane's TurnService, driven over a runtime's service (no Podman;
tests/turn_fixtures.py): the streamed and the whole answer, what the transcript and the audit log
record (tokens from the ledger, tool calls, a denied tool's alarm, trigger and actor), failures,
refusals (hold, stopped, budget, runtime state) through the API and the CLI, a scheduled turn,
and hostile names."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.control import turns as turns_module
from appliance.errors import TurnRefused
from appliance.store import open_store
from appliance.store.inference_store import InferenceStore
from appliance.store.sandbox_store import SandboxStore
from blueprints.runtimes import Exec, Reply
from inference.ports import UsageRecord
from tests.turn_fixtures import (
    AGENT,
    NOTICE,
    TOKEN,
    Sandboxes,
    World,
    ndjson,
    reply_events,
    turn_world,
)


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    with turn_world(tmp_path, monkeypatch) as made:
        yield made


# -- streamed and whole ----------------------------------------------------------------------


def test_a_streamed_turn_through_the_api_is_recorded_with_tokens_tools_and_actor(
    world: World,
) -> None:
    message = 'hi\n{"type": "done"} [red]x[/]'
    world.script.events = reply_events(
        "Hel", "lo", tool={"name": "cron", "arguments": '{"every": "1m"}', "denied": True}
    )
    world.script.usage = (120, 30, 1.25)
    body = {"message": message, "session": "s-1", "stream": True}
    response = world.api.post(f"/agents/{AGENT}/turns", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/x-ndjson")
    events = ndjson(response)
    assert [e["type"] for e in events] == ["delta", "tool", "delta", "done"]
    assert [e["text"] for e in events if e["type"] == "delta"] == ["Hel", "lo"]
    tool = {"name": "cron", "arguments": '{"every": "1m"}', "denied": True}
    assert events[1] == {"type": "tool", **tool}
    done = events[-1]
    assert done["ok"] is True and done["reply"] == "Hello" and done["session"] == "s-1"
    assert done["tokens"] == {
        "prompt": 120, "completion": 30, "total": 150, "model_time_s": 1.25, "requests": 1,
        "overlapping": False,
    }  # fmt: skip
    assert done["notices"] == [NOTICE] and done["trigger"] == "manual"
    # The runtime got the message as sent, with its token; nothing else did.
    [seen] = world.script.requests
    assert seen == {"message": message, "session": "s-1", "authorization": f"Bearer {TOKEN}"}

    [line] = world.transcript()
    assert line["message"] == message and line["reply"] == "Hello" and line["ok"] is True
    assert line["trigger"] == "manual" and line["actor"] == "uid:0"
    assert line["actor_kind"] == "unix" and line["tool_calls"] == [tool]
    assert line["tokens"]["total"] == 150 and line["session_id"] == "sid-1"
    assert line["duration_s"] >= 0 and line["cancelled"] is False and "stderr_tail" not in line
    [turn] = world.audit("agent.turn")
    assert turn["agent"] == AGENT and turn["trigger"] == "manual" and turn["actor"] == "uid:0"
    assert turn["ok"] is True and turn["tool_calls"] == 1
    [alarm] = world.audit("agent.tool_denied")
    assert alarm["tool"] == "cron" and alarm["agent"] == AGENT and alarm["actor"] == "uid:0"
    assert [r["key_name"] for r in world.audit("key.usage")] == [f"sandbox-{AGENT}"]
    assert world.plane.agents.get(AGENT)["turns"] == 1


def test_a_turn_answered_whole_is_its_done_record(world: World) -> None:
    world.script.events = reply_events("pong")
    response = world.api.post(f"/agents/{AGENT}/turns", json={"message": "ping"})
    assert response.status_code == 200, response.text
    done = response.json()
    assert done["type"] == "done" and done["ok"] is True and done["reply"] == "pong"
    assert done["session"].startswith("run-") and done["exit_code"] is None
    assert world.audit("agent.tool_denied") == []


def test_a_runtime_that_fails_is_a_failed_turn_with_its_error(world: World) -> None:
    world.script.events = [
        {"type": "delta", "text": "par"},
        {"type": "finished", "ok": False, "text": "", "error": "model timed out"},
    ]
    done = world.api.post(f"/agents/{AGENT}/turns", json={"message": "x"}).json()
    assert done["ok"] is False and done["error"] == "model timed out"
    assert done["reply"] == "par"  # what the client saw before the failure
    [line] = world.transcript()
    assert line["ok"] is False and line["error"]


def test_the_agent_socket_gone_is_a_failed_turn_recorded(world: World, tmp_path: Path) -> None:
    """The runtime died between the gate and the drive: no traceback, a failed record."""
    with world.plane.sandboxes.manager() as sandboxes:
        socket = sandboxes.socket
    socket.unlink()
    done = world.api.post(f"/agents/{AGENT}/turns", json={"message": "x"}).json()
    assert done["ok"] is False and "ConnectError" in done["error"], done
    assert world.transcript()[-1]["error"] == done["error"]


def test_a_symlink_in_place_of_the_agent_socket_is_not_followed(
    world: World, tmp_path: Path
) -> None:
    """The socket's directory is the agent's: a symlink there to another socket of the host
    (root connects) is refused, and that socket is never reached."""
    elsewhere = tmp_path / "elsewhere.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(elsewhere))
    listener.listen()
    listener.settimeout(0.5)
    with world.plane.sandboxes.manager() as sandboxes:
        agent_socket = sandboxes.socket
    agent_socket.unlink()
    agent_socket.symlink_to(elsewhere)
    world.script.events = reply_events("never")
    try:
        done = world.api.post(f"/agents/{AGENT}/turns", json={"message": "x"}).json()
        with pytest.raises(TimeoutError):
            listener.accept()  # nothing connected to it
    finally:
        listener.close()
    assert done["ok"] is False and done["cancelled"] is False
    assert done["error"].startswith(f"AgentSocketRefused: {agent_socket} is a symlink, not "), done
    assert "refused" in done["error"] and world.transcript()[-1]["error"] == done["error"]
    assert world.script.requests == []


def test_the_record_keeps_the_runtimes_id_status_and_usage_only(world: World) -> None:
    """The runtime's whole response (up to 1 MiB, the reply again) is not kept line after line."""
    raw = {"id": "resp_1", "status": "completed", "usage": {"total_tokens": 5},
           "output": [{"type": "message", "content": [{"text": "x" * 100_000}]}]}  # fmt: skip
    world.script.events = [*reply_events("hi")[:-1], {**reply_events("hi")[-1], "raw": raw}]
    done = world.api.post(f"/agents/{AGENT}/turns", json={"message": "x"}).json()
    kept = {"id": "resp_1", "status": "completed", "usage": {"total_tokens": 5}}
    assert done["raw"] == kept and world.transcript()[-1]["raw"] == kept


def test_turns_of_one_agent_at_once_say_their_tokens_overlap(world: World) -> None:
    """Their token windows hold each other's ledger rows: each says so; a turn alone does not."""
    world.script.events = reply_events("a ", "b")
    world.script.usage = (10, 5, 0.5)
    first = world.plane.turns.start(None, AGENT, "one", "s-1")
    assert next(first)["type"] == "delta"  # the first turn is in its runtime now
    second = list(world.plane.turns.start(None, AGENT, "two", "s-2"))
    rest = list(first)
    assert second[-1]["tokens"]["overlapping"] is rest[-1]["tokens"]["overlapping"] is True
    assert rest[-1]["tokens"]["requests"] == 2  # its own row and the second turn's
    alone = list(world.plane.turns.start(None, AGENT, "three", "s-3"))[-1]
    assert alone["tokens"]["overlapping"] is False and alone["tokens"]["requests"] == 1
    assert [t["tokens"]["overlapping"] for t in world.transcript()] == [True, True, False]


class _ExecRuntime:
    """A runtime without a service: a command per turn (as a `kind: command` with `turn:`)."""

    def __init__(self, blueprint: Any) -> None:
        self.blueprint = blueprint

    def service(self) -> None:
        return None

    def turn(self, message: str, session: str) -> Exec:
        return Exec(["echo", message])

    def read_turn(self, exit_code: int, stdout: bytes, stderr: bytes) -> Reply:
        return Reply(ok=exit_code == 0, text=stdout.decode())


def test_an_exec_turn_that_finished_stands_when_its_client_leaves_at_the_last_event(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran = threading.Event()

    def exec_(self: Sandboxes, name: str, argv: list[str], **_kw: Any) -> tuple[int, bytes, bytes]:
        ran.set()
        return 0, b"all done", b""

    monkeypatch.setattr(turns_module, "runtime_for", _ExecRuntime)
    monkeypatch.setattr(Sandboxes, "exec", exec_, raising=False)
    events = world.plane.turns.start(None, AGENT, "go", "s-8")
    assert next(events) == {"type": "delta", "text": "all done"}
    events.close()  # the client went away before the done record
    [line] = world.transcript()
    assert ran.is_set() and line["ok"] is True and line["cancelled"] is False
    assert line["reply"] == "all done" and line["error"] is None


def test_an_exec_turn_is_refused_while_the_agents_main_process_failed_closed(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every agent's main process is kept up and checked in, an exec-turn one's too: a turn
    while it is stopped (the control plane was away) is refused, not run beside it."""
    ran = threading.Event()
    monkeypatch.setattr(turns_module, "runtime_for", _ExecRuntime)
    monkeypatch.setattr(Sandboxes, "exec", lambda *_a, **_k: ran.set(), raising=False)
    world.runtime.update(state="fail_closed", reason="control plane silent for 25 s")
    with pytest.raises(TurnRefused, match="runtime is fail_closed: control plane silent"):
        world.plane.turns.start(None, AGENT, "go", "s-9")
    assert not ran.is_set()
    [line] = world.transcript()
    assert "fail_closed" in line["refused"]


# -- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "reason", "hint"),
    [
        ("held", "the kill switch holds every sandbox (operator: incident 7)", "release"),
        ("stopped", f"{AGENT} is stopped", f"agent start {AGENT}"),
        ("budget", f"{AGENT} is over its daily budget: 1000 of 1000 tokens", "budget set"),
        ("runtime", f"{AGENT}'s runtime is backoff: exited with code 1", "agent logs"),
    ],
)
def test_a_refused_turn_is_a_409_before_any_byte_and_is_recorded(
    world: World, setup: str, reason: str, hint: str
) -> None:
    with open_store(world.state) as store:
        if setup == "held":
            SandboxStore(store).hold("operator: incident 7")
        elif setup == "stopped":
            SandboxStore(store).set_state(AGENT, "stopped")
    if setup == "budget":  # what the agent's key spent today, as the gateway logged it
        with InferenceStore(world.state) as inference:
            inference.record_usage(UsageRecord(world.key_id, "m", 900, 100, 2.0, 200, False))
    if setup == "runtime":
        world.runtime.update(state="backoff", reason="exited with code 1")
    for stream in (True, False):
        body = {"message": "hello", "session": "s-2", "stream": stream}
        response = world.api.post(f"/agents/{AGENT}/turns", json=body)
        assert response.status_code == 409, response.text
        assert response.headers["content-type"] == "application/json"
        error = response.json()["error"]
        assert error["type"] == "turn_refused" and reason in error["message"], error
        assert hint in error["hint"]
    assert world.script.requests == []  # the runtime was never asked
    lines = world.transcript()
    assert len(lines) == 2 and all(reason in line["refused"] for line in lines)
    assert {line["trigger"] for line in lines} == {"manual"} and lines[0]["ok"] is False
    audited = world.audit("agent.turn")
    assert len(audited) == 2 and all(reason in r["refused"] for r in audited)
    assert world.plane.agents.get(AGENT)["turns"] == 0  # a refused turn is no turn taken

    # The CLI: one line with the reason and the hint, exit 12.
    out = world.cli("agent", "run", AGENT, "hello")
    assert out.returncode == 12, out.stderr
    first, *rest = out.stderr.strip().splitlines()
    assert first.startswith("appliance: error: ") and reason in first
    assert len(rest) == 1 and hint in rest[0] and out.stdout == ""


def test_a_scheduled_turn_is_gated_and_recorded_as_the_control_plane(world: World) -> None:
    """What the scheduler calls: `start(None, ..., trigger="schedule")`."""
    world.script.events = reply_events("done for today")
    events = list(world.plane.turns.start(None, AGENT, "summarise", "daily", "schedule"))
    assert events[-1]["reply"] == "done for today" and events[-1]["trigger"] == "schedule"
    assert events[-1]["actor"] == "control-plane"
    with open_store(world.state) as store:
        SandboxStore(store).hold("night")
    with pytest.raises(TurnRefused, match="holds every sandbox"):
        world.plane.turns.start(None, AGENT, "summarise", "daily", "schedule")
    with pytest.raises(TurnRefused):
        world.plane.turns.gate(AGENT)  # the gate alone records nothing
    assert [(t["trigger"], t["actor"], "refused" in t) for t in world.transcript()] == [
        ("schedule", "control-plane", False),
        ("schedule", "control-plane", True),
    ]
    assert {r["actor_kind"] for r in world.audit("agent.turn")} == {"internal"}


def test_bad_names_and_sessions_are_refused_before_anything(world: World) -> None:
    for name, body, status in (
        (AGENT, {"message": "x", "session": "../etc", "stream": True}, 422),
        ("a%20b", {"message": "x", "stream": True}, 422),
        ("nosuch", {"message": "x", "stream": True}, 404),
    ):
        response = world.api.post(f"/agents/{name}/turns", json=body)
        assert response.status_code == status, response.text
        assert response.json()["error"]["hint"] or status == 422
    assert world.transcript() == [] and world.script.requests == []


@pytest.mark.parametrize("name", ["", ".", "..", "../helper", "a/b", "helper\x00", "A" * 64])
def test_hostile_names_reach_no_path_and_no_record(world: World, name: str) -> None:
    """The name is a path component on the host (the transcript): refused before anything."""
    from sandbox.names import InvalidNameError

    for call in (
        lambda: world.plane.turns.start(None, name, "x"),
        lambda: world.plane.turns.gate(name),
        lambda: world.plane.turns.transcript(name),
    ):
        with pytest.raises(InvalidNameError):
            call()
    assert not (world.state / "agents").exists() and world.audit("agent.turn") == []
