"""Turns through the control plane's TurnService, driven over a runtime's service (no Podman).

The control plane is the real one (create_app over a real ControlPlane and its store, served by
uvicorn on a unix socket), the CLI a real subprocess. Replaced at their boundaries only: the
runtime adapter (a `drive()` that speaks a small NDJSON protocol over the HTTP client it is
handed), the runtime itself (a real HTTP server on the "agent socket", streaming as told and
noting when its client hangs up), the part of SandboxManager a turn asks (records in the real
store; the socket, token and runtime state as the supervisor would report them) and the
backend's model card behind the notices.
"""

from __future__ import annotations

import json
import os
import select
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.audit import audit_path, records
from appliance.config import load_config
from appliance.control import turns as turns_module
from appliance.control.api import create_app
from appliance.control.plane import ControlPlane
from appliance.control.server import bind_unix, server
from appliance.errors import TurnRefused
from appliance.store import open_store
from appliance.store.agent_store import AgentStore
from appliance.store.inference_store import InferenceStore
from appliance.store.sandbox_store import SandboxStore
from blueprints.model import Blueprint
from blueprints.runtimes import Delta, Finished, Service, ToolCall
from inference.ports import Budget, UsageRecord
from tests.helpers import cli_env

APPLIANCE = str(Path(sys.executable).parent / "appliance")
AGENT = "helper"
TOKEN = "runtime-token-for-the-test"
NOTICE = "reply from a test model (not a real one)"


# -- the runtime: a real HTTP server on the agent socket -------------------------------------


@dataclass
class Script:
    """What the runtime answers each turn with, and what it saw."""

    events: list[dict[str, Any]] = field(default_factory=list)
    pause_s: float = 0.0  # between events
    silence_s: float = 0.0  # before the first event (a long prefill), watching for a hang-up
    usage: tuple[int, int, float] | None = None  # a ledger row "the gateway" writes per turn
    requests: list[dict[str, Any]] = field(default_factory=list)
    hung_up: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def _handler(script: Script, key_id: str, state_dir: Path) -> type[BaseHTTPRequestHandler]:
    class Runtime(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # the body ends when the connection closes

        def log_message(self, *args: object) -> None:  # a unix peer has no address to log
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            body["authorization"] = self.headers.get("authorization")
            script.requests.append(body)
            if script.usage is not None:  # the model call this turn makes, as the gateway logs
                prompt, completion, latency = script.usage
                with InferenceStore(state_dir) as inference:
                    inference.record_usage(
                        UsageRecord(key_id, "m", prompt, completion, latency, 200, True)
                    )
            self.send_response(200)
            self.send_header("content-type", "application/x-ndjson")
            self.end_headers()
            self.wfile.flush()
            if not self.stay_silent(script.silence_s):
                script.hung_up.set()
                return
            try:
                for event in script.events:
                    time.sleep(script.pause_s)
                    self.wfile.write(json.dumps(event).encode() + b"\n")
                    self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                script.hung_up.set()
                return
            script.finished.set()

        def stay_silent(self, seconds: float) -> bool:
            """Send nothing for `seconds`, as a runtime does while its model reads the prompt;
            False as soon as the client hangs up (it sent its request: any more is EOF)."""
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                readable, _, _ = select.select([self.connection], [], [], 0.05)
                if readable and self.connection.recv(1, socket.MSG_PEEK) == b"":
                    return False
            return True

    return Runtime


class FakeRuntime:
    """The adapter's side of the protocol (blueprints/runtimes AgentRuntime): a service, and a
    drive() that streams the turn over the client it is handed."""

    def __init__(self, blueprint: Blueprint) -> None:
        self.blueprint = blueprint

    def service(self) -> Service:
        return Service(port=18789, token_env="TEST_TOKEN")

    def drive(
        self, http: httpx.Client, token: str, message: str, session: str
    ) -> Iterator[Delta | ToolCall | Finished]:
        body = {"message": message, "session": session}
        headers = {"authorization": f"Bearer {token}"}
        with http.stream("POST", "/turn", json=body, headers=headers) as response:
            for line in response.iter_lines():
                event = json.loads(line)
                if event["type"] == "delta":
                    yield Delta(event["text"])
                elif event["type"] == "tool":
                    yield ToolCall(event["name"], event.get("arguments", ""), event["denied"])
                else:
                    usage = event.get("usage", {})
                    yield Finished(
                        event["ok"], event["text"], usage, "sid-1", None, event.get("error")
                    )


# -- SandboxManager's part in a turn, over the real store ------------------------------------


class Sandboxes:
    def __init__(self, state_dir: Path, socket: Path, runtime: dict[str, Any]) -> None:
        self.store = open_store(state_dir)
        self.boxes = SandboxStore(self.store)
        self.socket = socket
        self.runtime = runtime

    def agent_socket(self, name: str) -> Path:
        return self.socket

    def runtime_token(self, name: str) -> str:
        return TOKEN

    def runtime_state(self, name: str) -> dict[str, Any]:
        return dict(self.runtime)


@dataclass
class World:
    plane: ControlPlane
    state: Path
    script: Script
    runtime: dict[str, Any]  # the supervisor's report's runtime section
    key_id: str
    api: httpx.Client
    env: dict[str, str]

    def transcript(self) -> list[dict[str, Any]]:
        return self.plane.turns.transcript(AGENT)

    def audit(self, event: str) -> list[dict[str, Any]]:
        return [r for r in records(audit_path(self.state)) if r.get("event") == event]

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [APPLIANCE, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )


def _blueprint() -> Blueprint:
    return Blueprint.model_validate(
        {
            "name": "served",
            "version": "1.0.0",
            "runtime": {"kind": "command", "command": ["sleep", "infinity"]},
            "image": {"name": "localhost/appliance-base", "digest": "sha256:" + "ab" * 32},
            "sandbox": {"base": "default"},
            "budgets": {"daily_tokens": 1000},
        }
    )


@contextmanager
def _serve_control(plane: ControlPlane, socket: Path) -> Iterator[None]:
    """The control plane's own server (server.py: peer credentials, h11) on its socket."""
    api_server = server(create_app(plane))
    listening = bind_unix(socket)
    thread = threading.Thread(target=api_server.run, kwargs={"sockets": [listening]})
    thread.start()
    deadline = time.monotonic() + 10
    while not api_server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "control plane did not start"
        time.sleep(0.02)
    try:
        yield
    finally:
        api_server.should_exit = True
        thread.join(10)
        listening.close()


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    root = Path(os.path.realpath(tmp_path))
    state = root / "s"
    config = load_config({"state_dir": str(state)})
    plane = ControlPlane(config)
    bp = _blueprint()
    with InferenceStore(state) as inference:
        key, _secret = inference.create_key(f"sandbox-{AGENT}", "sandbox")
        inference.set_budget(Budget(key_id=key.id, daily_tokens=1000))
    with open_store(state) as store:
        AgentStore(store).deploy(
            AGENT, bp.name, bp.version, bp.digest(), "img", "created",
            origin="client", blueprint_json=bp.canonical(),
        )  # fmt: skip
        SandboxStore(store).upsert(
            AGENT, image="img", command=["sleep"], state="running", key_id=key.id
        )
    script = Script()
    agent_socket = root / "agent.sock"
    runtime_server = _UnixHTTPServer(str(agent_socket), _handler(script, key.id, state))
    threading.Thread(target=runtime_server.serve_forever, daemon=True).start()
    runtime: dict[str, Any] = {"state": "running"}

    @contextmanager
    def sandboxes(ready: bool = True) -> Iterator[Sandboxes]:
        made = Sandboxes(state, agent_socket, runtime)
        try:
            yield made
        finally:
            made.store.close()

    monkeypatch.setattr(plane.sandboxes, "manager", sandboxes)
    monkeypatch.setattr(turns_module, "runtime_for", FakeRuntime)
    monkeypatch.setattr(turns_module, "turn_notices", lambda *_a, **_k: [NOTICE])
    control = state / "run" / "control.sock"
    with _serve_control(plane, control):
        api = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(control)),
            base_url="http://control/api/v1",
            timeout=30,
        )
        with api:
            yield World(plane, state, script, runtime, key.id, api, cli_env(state, root))
    runtime_server.shutdown()
    runtime_server.server_close()
    plane.close()


def _reply(*parts: str, tool: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = [{"type": "delta", "text": p} for p in parts]
    if tool is not None:
        events.insert(1, {"type": "tool", **tool})
    return [*events, {"type": "finished", "ok": True, "text": "".join(parts)}]


def _ndjson(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line) for line in response.text.splitlines()]


# -- streamed and whole ----------------------------------------------------------------------


def test_a_streamed_turn_through_the_api_is_recorded_with_tokens_tools_and_actor(
    world: World,
) -> None:
    message = 'hi\n{"type": "done"} [red]x[/]'
    world.script.events = _reply(
        "Hel", "lo", tool={"name": "cron", "arguments": '{"every": "1m"}', "denied": True}
    )
    world.script.usage = (120, 30, 1.25)
    body = {"message": message, "session": "s-1", "stream": True}
    response = world.api.post(f"/agents/{AGENT}/turns", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/x-ndjson")
    events = _ndjson(response)
    assert [e["type"] for e in events] == ["delta", "tool", "delta", "done"]
    assert [e["text"] for e in events if e["type"] == "delta"] == ["Hel", "lo"]
    tool = {"name": "cron", "arguments": '{"every": "1m"}', "denied": True}
    assert events[1] == {"type": "tool", **tool}
    done = events[-1]
    assert done["ok"] is True and done["reply"] == "Hello" and done["session"] == "s-1"
    assert done["tokens"] == {
        "prompt": 120, "completion": 30, "total": 150, "model_time_s": 1.25, "requests": 1
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
    world.script.events = _reply("pong")
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
    """What the scheduler calls: `stream(None, ..., trigger="schedule")` in its own thread."""
    world.script.events = _reply("done for today")
    events = list(world.plane.turns.stream(None, AGENT, "summarise", "daily", "schedule"))
    assert events[-1]["reply"] == "done for today" and events[-1]["trigger"] == "schedule"
    assert events[-1]["actor"] == "control-plane"
    with open_store(world.state) as store:
        SandboxStore(store).hold("night")
    refused = world.plane.turns.stream(None, AGENT, "summarise", "daily", "schedule")
    with pytest.raises(TurnRefused, match="holds every sandbox"):
        next(refused)
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


# -- a client that goes away --------------------------------------------------------------------


def test_a_client_that_hangs_up_cancels_the_turn_in_the_runtime(world: World) -> None:
    world.script.events = [{"type": "delta", "text": f"{i} "} for i in range(200)]
    world.script.pause_s = 0.05  # 10 s of reply
    body = {"message": "count", "session": "s-3", "stream": True}
    with world.api.stream("POST", f"/agents/{AGENT}/turns", json=body) as response:
        lines = response.iter_lines()
        assert json.loads(next(lines)) == {"type": "delta", "text": "0 "}
    # The connection is closed: the runtime's side sees its client go within a few events.
    assert world.script.hung_up.wait(5), "the runtime's stream was not closed"
    assert not world.script.finished.is_set()
    deadline = time.monotonic() + 5
    while not world.transcript() and time.monotonic() < deadline:
        time.sleep(0.05)
    [line] = world.transcript()
    assert line["cancelled"] is True and line["ok"] is False and line["session"] == "s-3"
    assert line["reply"].startswith("0 ") and len(line["reply"].split()) < 200
    [turn] = world.audit("agent.turn")
    assert turn["cancelled"] is True
    # Its lane slot is back: the next turn runs.
    world.script.events, world.script.pause_s = _reply("again"), 0.0
    again = world.api.post(f"/agents/{AGENT}/turns", json={"message": "x"})
    assert again.json()["reply"] == "again"


def test_a_hang_up_while_the_runtime_is_silent_cancels_at_once(world: World) -> None:
    """No event to notice the hang-up at: the control plane cuts the runtime's connection the
    moment its client goes, not when the runtime next speaks (here: 30 s later)."""
    world.script.silence_s = 30.0
    world.script.events = _reply("too late")
    body = {"message": "think", "session": "s-6", "stream": True}
    with world.api.stream("POST", f"/agents/{AGENT}/turns", json=body) as response:
        assert response.status_code == 200
        time.sleep(0.5)  # the turn is waiting on its runtime
        hung_up_at = time.monotonic()
    assert world.script.hung_up.wait(5), "the runtime's connection was not cut"
    assert time.monotonic() - hung_up_at < 5
    deadline = time.monotonic() + 5
    while not world.transcript() and time.monotonic() < deadline:
        time.sleep(0.05)
    [line] = world.transcript()
    assert line["cancelled"] is True and line["reply"] == "" and line["session"] == "s-6"
    assert line["error"] == "cancelled: the client went away"
    world.script.silence_s = 0.0  # the lane slot is back
    assert world.api.post(f"/agents/{AGENT}/turns", json={"message": "x"}).json()["ok"]


def test_closing_the_events_early_cancels_and_records(world: World) -> None:
    world.script.events = [{"type": "delta", "text": "tick "} for _ in range(100)]
    world.script.pause_s = 0.05
    events = world.plane.turns.start(None, AGENT, "go", "s-4", "schedule")
    assert next(events) == {"type": "delta", "text": "tick "}
    events.close()
    assert world.script.hung_up.wait(5)
    [line] = world.transcript()
    assert line["cancelled"] is True and line["trigger"] == "schedule"


def test_a_turn_closed_before_it_ran_is_recorded_cancelled(world: World) -> None:
    world.script.events = _reply("never asked")
    world.plane.turns.start(None, AGENT, "go", "s-7").close()
    [line] = world.transcript()
    assert line["cancelled"] is True and line["session"] == "s-7" and line["reply"] == ""
    assert world.script.requests == []  # the runtime was never asked


def test_streams_hold_their_lane_slots_until_they_end(world: World) -> None:
    """Eight slow streams take the lane's eight slots; a ninth turn is refused (429) at once;
    when they end, turns run again."""
    from appliance.control.api import lanes

    world.script.events = [*_reply(*"." * 40)]
    world.script.pause_s = 0.05
    socket = world.state / "run" / "control.sock"
    clients = [
        httpx.Client(transport=httpx.HTTPTransport(uds=str(socket)), base_url="http://c/api/v1")
        for _ in range(lanes.TURNS.slots)
    ]
    responses = []
    try:
        for client in clients:
            body = {"message": "slow", "stream": True}
            response = client.send(client.build_request("POST", f"/agents/{AGENT}/turns",
                                                        json=body), stream=True)  # fmt: skip
            responses.append(response)
            assert response.status_code == 200
        busy = world.api.post(f"/agents/{AGENT}/turns", json={"message": "one more"})
        assert busy.status_code == 429 and busy.json()["error"]["type"] == "busy"
        for response in responses:
            assert _ndjson_lines(response)[-1]["type"] == "done"
    finally:
        for response in responses:
            response.close()
        for client in clients:
            client.close()
    world.script.events, world.script.pause_s = _reply("free"), 0.0
    assert world.api.post(f"/agents/{AGENT}/turns", json={"message": "x"}).json()["ok"]
    # Turns that ended together wrote whole lines (the one refused with 429 wrote none).
    lines = world.transcript()
    assert len(lines) == lanes.TURNS.slots + 1 and all(line["ok"] for line in lines)
    assert sorted(line["reply"] for line in lines) == ["." * 40] * lanes.TURNS.slots + ["free"]


def _ndjson_lines(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line) for line in response.iter_lines() if line]


# -- the CLI -------------------------------------------------------------------------------------


def test_agent_run_prints_the_reply_as_it_streams_then_the_notice_once(world: World) -> None:
    world.script.events = [
        {"type": "delta", "text": "first "},
        *[{"type": "delta", "text": "."} for _ in range(30)],
        {"type": "finished", "ok": True, "text": "first " + "." * 30},
    ]
    world.script.pause_s = 0.1  # 3 s of reply
    proc = subprocess.Popen(
        [APPLIANCE, "agent", "run", AGENT, "go", "--session", "s-5"],
        env=world.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.read(6)  # arrives while the runtime is still streaming
        assert first == b"first " and not world.script.finished.is_set()
        rest, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert first + rest == b"first " + b"." * 30 + b"\n"
    assert err.decode().count(NOTICE) == 1

    as_json = world.cli("agent", "run", AGENT, "again", "--json")
    assert as_json.returncode == 0, as_json.stderr
    record = json.loads(as_json.stdout)  # the done record only, no deltas before it
    assert record["reply"] == "first " + "." * 30 and record["notices"] == [NOTICE]
    assert "stderr_tail" not in record and "type" not in record


def test_agent_chat_streams_each_line_in_one_session(world: World) -> None:
    world.script.events = _reply("one ", "reply")
    chat = subprocess.run(
        [APPLIANCE, "agent", "chat", AGENT],
        env=world.env, input="hello\n\nagain\n", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count(f"{AGENT}> one reply\n") == 2, chat.stdout
    assert chat.stderr.count(NOTICE) == 1  # once per chat, not per line
    sessions = {r["session"] for r in world.script.requests}
    assert len(world.script.requests) == 2 and len(sessions) == 1
    assert sessions.pop().startswith("chat-")


@pytest.mark.parametrize("name", ["", ".", "..", "../helper", "a/b", "helper\x00", "A" * 64])
def test_hostile_names_reach_no_path_and_no_record(world: World, name: str) -> None:
    """The name is a path component on the host (the transcript): refused before anything."""
    from sandbox.names import InvalidNameError

    for call in (
        lambda: world.plane.turns.start(None, name, "x"),
        lambda: next(world.plane.turns.stream(None, name, "x")),
        lambda: world.plane.turns.gate(name),
        lambda: world.plane.turns.transcript(name),
    ):
        with pytest.raises(InvalidNameError):
            call()
    assert not (world.state / "agents").exists() and world.audit("agent.turn") == []
