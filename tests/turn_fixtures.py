"""A real control plane for turn tests, without Podman (test_control_turns.py,
test_control_turn_streams.py): create_app over a real ControlPlane and its store, served by the
control plane's own server on a unix socket, and the CLI's environment for it. Replaced at their
boundaries only: the runtime adapter (`FakeRuntime`: a drive() speaking a small NDJSON protocol
over the HTTP client it is handed), the runtime itself (a real HTTP server on the "agent socket",
streaming as a `Script` says and noting when its client hangs up), the part of SandboxManager a
turn asks (records in the real store; the socket, token and runtime state as the supervisor
would report them) and the backend's model card behind the notices.
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
from appliance.control.plane import ControlPlane
from appliance.control.server import bind_unix
from appliance.store import open_store
from appliance.store.agent_store import AgentStore
from appliance.store.inference_store import InferenceStore
from appliance.store.sandbox_store import SandboxStore
from blueprints.model import Blueprint
from blueprints.runtimes import Delta, Finished, Service, ToolCall
from inference.ports import Budget, UsageRecord
from tests.control_fixtures import serving
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
    ready_status: int = 200  # what GET /readyz answers
    sse: bool = False  # events as server-sent events (a real adapter's protocol), not NDJSON
    requests: list[dict[str, Any]] = field(default_factory=list)  # the POSTs
    ready_checks: int = 0
    hung_up: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def _handler(script: Script, key_id: str, state_dir: Path) -> type[BaseHTTPRequestHandler]:
    class Runtime(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # the body ends when the connection closes

        def log_message(self, *args: object) -> None:  # a unix peer has no address to log
            pass

        def do_GET(self) -> None:
            script.ready_checks += 1
            self.send_response(script.ready_status)
            self.send_header("content-length", "0")
            self.end_headers()

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
            ctype = "text/event-stream" if script.sse else "application/x-ndjson"
            self.send_header("content-type", ctype)
            self.end_headers()
            self.wfile.flush()
            if not self.stay_silent(script.silence_s):
                script.hung_up.set()
                return
            try:
                for event in script.events:
                    time.sleep(script.pause_s)
                    line = json.dumps(event).encode()
                    self.wfile.write(b"data: " + line + b"\n\n" if script.sse else line + b"\n")
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
                    usage, raw = event.get("usage", {}), event.get("raw")
                    yield Finished(
                        event["ok"], event["text"], usage, "sid-1", raw, event.get("error")
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

    def has_service(self, name: str) -> bool:
        return True  # every agent's main process is kept up and checked in


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
def turn_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
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
    with serving(plane, [bind_unix(control)]):
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


def reply_events(*parts: str, tool: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = [{"type": "delta", "text": p} for p in parts]
    if tool is not None:
        events.insert(1, {"type": "tool", **tool})
    return [*events, {"type": "finished", "ok": True, "text": "".join(parts)}]


def ndjson(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line) for line in response.text.splitlines()]
