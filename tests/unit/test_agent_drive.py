"""drive(): one turn of an always-on runtime over HTTP, against real servers on loopback.

- A served `kind: command` against tests/fixtures/responses_server.py, run as a subprocess the
  way a test blueprint runs it (`python3 -c SOURCE PORT`): streamed turns in sessions, waiting
  for a runtime that is starting, a wrong token, a failed turn, closing early (the server sees
  the disconnect).
- OpenClaw against a stand-in that replays what OpenClaw 2026.9.6's gateway answered (the SSE of
  a turn that ran `exec`, the sessions_history of that session: tests/fixtures/openclaw/), and
  hostile or broken answers: each one a Finished(ok=False) with one line, never an exception.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from blueprints.catalog import Catalog
from blueprints.model import Blueprint
from blueprints.runtimes import Delta, Finished, ToolCall, TurnEvent
from blueprints.runtimes.command import CommandRuntime
from blueprints.runtimes.openclaw import OpenClawRuntime

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SERVER = FIXTURES / "responses_server.py"
RECORDED_SSE = (FIXTURES / "openclaw" / "responses-tool-turn.sse").read_bytes()
RECORDED_HISTORY = json.loads((FIXTURES / "openclaw" / "sessions-history.json").read_text())
RUN_ID = "resp_cac9b82d-3373-4a71-884a-5309ed94f115"  # the recorded turn's response id
TOKEN = "runtime-token-for-the-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drive(runtime: Any, port: int, message: str, session: str, token: str = TOKEN) -> list:
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        return list(runtime.drive(http, token, message, session))


def split(events: list[TurnEvent]) -> tuple[list[str], list[ToolCall], Finished]:
    *rest, last = events
    assert isinstance(last, Finished), events  # always exactly one Finished, last
    assert not any(isinstance(e, Finished) for e in rest)
    deltas = [e.text for e in rest if isinstance(e, Delta)]
    return deltas, [e for e in rest if isinstance(e, ToolCall)], last


def failed(events: list[TurnEvent]) -> str:
    *_, last = split(events)
    assert not last.ok and last.error and "\n" not in last.error, last
    return last.error


# -- a served command, against the stdlib runtime ---------------------------------------------


def served(port: int) -> CommandRuntime:
    bp = Blueprint.model_validate(
        {
            "name": "echo",
            "version": "1.0.0",
            "runtime": {"kind": "command", "command": ["true"], "serve": {"port": port}},
            "image": {"name": "localhost/appliance-base", "digest": "sha256:" + "ab" * 32},
            "sandbox": {"base": "default"},
        }
    )
    runtime = CommandRuntime(bp)
    runtime.ready_timeout_s = 15
    return runtime


@contextmanager
def responses_server(
    port: int, tmp_path: Path, *, start_after: float = 0, **env: str
) -> Iterator[Path]:
    """tests/fixtures/responses_server.py as a test blueprint runs it; its disconnect log."""
    log = tmp_path / "disconnects.log"
    argv = [sys.executable, "-c", SERVER.read_text(), str(port)]  # inline, as in a blueprint
    full_env = {**os.environ, "AGENT_TOKEN": TOKEN, "DISCONNECT_LOG": str(log), **env}
    procs: list[subprocess.Popen[bytes]] = []
    starter = threading.Timer(
        start_after, lambda: procs.append(subprocess.Popen(argv, env=full_env))
    )
    starter.start()
    try:
        yield log
    finally:
        starter.cancel()
        starter.join()
        for proc in procs:
            proc.terminate()
            proc.wait(10)


def test_turns_stream_in_sessions(tmp_path: Path) -> None:
    port = free_port()
    runtime = served(port)
    with responses_server(port, tmp_path, CHUNK_DELAY="0.15"):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            arrived: list[float] = []
            events = []
            for event in runtime.drive(http, TOKEN, "hello there", "s1"):
                arrived.append(time.monotonic())
                events.append(event)
        deltas, calls, done = split(events)
        assert done.ok and done.error is None and calls == []
        assert "".join(deltas) == done.text == "s1|1|hello there" and len(deltas) == 4
        assert arrived[-2] - arrived[0] > 0.3  # streamed as the runtime wrote, not at the end
        assert done.usage == {"input": 11, "output": 16, "cacheRead": 0, "cacheWrite": 0,
                              "total": 27}  # fmt: skip
        assert done.session_id == "resp_s1_1" and done.raw and done.raw["status"] == "completed"
        # The same session again (the runtime kept it), another session, then the first.
        assert split(drive(runtime, port, "again", "s1"))[2].text == "s1|2|again"
        assert split(drive(runtime, port, "x", "other"))[2].text == "other|1|x"
        assert split(drive(runtime, port, "y", "s1"))[2].text == "s1|3|y"


def test_a_runtime_that_is_starting_is_waited_for(tmp_path: Path) -> None:
    """Connections refused, then /readyz 503, then the turn."""
    port = free_port()
    with responses_server(port, tmp_path, start_after=1.0, READY_AFTER="1.0"):
        t0 = time.monotonic()
        *_, done = split(drive(served(port), port, "hi", "s1"))
        assert done.ok and done.text == "s1|1|hi" and time.monotonic() - t0 > 1.5


def test_a_runtime_that_never_listens_is_a_failed_turn() -> None:
    runtime = served(free_port())
    runtime.ready_timeout_s = 1
    t0 = time.monotonic()
    error = failed(drive(runtime, runtime.blueprint.runtime.serve.port, "hi", "s1"))
    assert error.startswith("the runtime was not ready within 1 s (ConnectError: ")
    assert time.monotonic() - t0 < 5


def test_a_wrong_token_and_a_failed_turn(tmp_path: Path) -> None:
    port = free_port()
    with responses_server(port, tmp_path):
        error = failed(drive(served(port), port, "hi", "s1", token="not-it"))
        assert error == "the runtime refused the agent's token (HTTP 401: Unauthorized)"
        events = drive(served(port), port, "FAIL", "s1")
        assert failed(events) == "the runtime failed the turn: the model failed (api_error)"
        assert "".join(split(events)[0]) == "s1|1|FAIL"  # what it said before is kept
        error = failed(drive(served(port), port, "hi", "cron:x"))
        assert error.startswith("session 'cron:x' is not ")


def test_closing_the_turn_early_closes_the_runtimes_stream(tmp_path: Path) -> None:
    port = free_port()
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    with responses_server(port, tmp_path) as log, client:
        turn = served(port).drive(client, TOKEN, "SLOW", "slow1")
        assert next(turn) == Delta(" tick")
        turn.close()
        deadline = time.monotonic() + 10
        while not (log.exists() and "disconnected slow1" in log.read_text()):
            assert time.monotonic() < deadline, "the runtime never saw the client go"
            time.sleep(0.1)
        # The client is still good for the next turn.
        *_, done = split(list(served(port).drive(client, TOKEN, "next", "s2")))
        assert done.ok and done.text == "s2|1|next"


# -- OpenClaw, against a stand-in for its gateway -----------------------------------------------


class StandIn(ThreadingHTTPServer):
    """OpenClaw's gateway as far as drive() sees it: /readyz, /v1/responses (`answer`: the raw
    HTTP response, or a function that writes one), /tools/invoke (`history`)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.answer: bytes | Callable[[BaseHTTPRequestHandler], None] = http(RECORDED_SSE)
        self.history: bytes = history_with()
        self.requests: list[tuple[str, dict[str, str], Any]] = []
        self.disconnected = threading.Event()

    @property
    def port(self) -> int:
        return self.server_address[1]


class _Handler(BaseHTTPRequestHandler):
    server: StandIn

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.wfile.write(http(b'{"ready":true}', "application/json"))

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(
            (self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        )
        answer = self.server.answer if self.path == "/v1/responses" else self.server.history
        if callable(answer):
            answer(self)
        else:
            self.wfile.write(answer)
        self.close_connection = True


def http(
    body: bytes, ctype: str = "text/event-stream", status: str = "200 OK", **extra: str
) -> bytes:
    headers = "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in extra.items())
    head = f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nConnection: close\r\n{headers}\r\n"
    return head.encode() + body


def sse(*events: dict[str, Any] | str) -> bytes:
    return b"".join(
        f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events
    )


@pytest.fixture
def gateway() -> Iterator[StandIn]:
    server = StandIn()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def openclaw() -> OpenClawRuntime:
    runtime = OpenClawRuntime(Catalog().get("openclaw"))
    runtime.ready_timeout_s = 5
    return runtime


def history_with(*messages: dict[str, Any]) -> bytes:
    details = {**RECORDED_HISTORY["result"]["details"]}
    details["messages"] = [*details["messages"], *messages]
    return http(
        json.dumps({"ok": True, "result": {"details": details}}).encode(), "application/json"
    )


def _run(run_id: str, **message: Any) -> dict[str, Any]:
    return {**message, "__openclaw": {"runId": run_id}}


def test_openclaw_turn_replayed(gateway: StandIn) -> None:
    """The recorded turn: its deltas, its reply and usage, and its tool calls from the history
    (only this run's; a tool the policy denies, or one OpenClaw says it has not, is denied)."""
    gateway.history = history_with(
        _run(RUN_ID, role="toolResult", toolCallId="call_2", toolName="cron", isError=True,
             content=[{"type": "text", "text": "Tool cron not found"}]),
        _run(RUN_ID, role="assistant", content=[
            {"type": "toolCall", "id": "call_3", "name": "tool_call",
             "arguments": {"id": "gateway"}},
            {"type": "toolCall", "id": "call_4", "name": "message", "arguments": {"to": "x"}}]),
        _run(RUN_ID, role="toolResult", toolCallId="call_3", toolName="tool_call", isError=False,
             content=[{"type": "text",
                       "text": '{"status":"error","error":"Unknown tool id: gateway."}'}]),
        _run("resp_an-earlier-turn", role="assistant", content=[
            {"type": "toolCall", "id": "call_0", "name": "write", "arguments": {}}]),
    )  # fmt: skip
    deltas, calls, done = split(
        drive(openclaw(), gateway.port, "please run TOOLCALL:exec", "task-3")
    )
    completed = json.loads(
        RECORDED_SSE.split(b"event: response.completed\ndata: ")[1].split(b"\n")[0]
    )
    assert done.ok and done.raw == completed["response"]
    assert done.text == completed["response"]["output"][0]["content"][0]["text"] == "".join(deltas)
    assert len(deltas) == 2
    assert done.usage == {"input": 468, "output": 112, "cacheRead": 2000, "cacheWrite": 0,
                          "total": 2580}  # fmt: skip
    assert done.session_id == RUN_ID
    assert calls == [
        ToolCall("exec", '{"command": "echo hi-from-exec"}', denied=False),
        ToolCall("cron", "", denied=True),  # OpenClaw: "Tool cron not found"
        ToolCall("gateway", '{"id": "gateway"}', denied=True),  # through the meta-tool
        ToolCall("message", '{"to": "x"}', denied=True),  # group:messaging, denied by the policy
    ]
    (path, headers, body), (path2, headers2, body2) = gateway.requests
    assert path == "/v1/responses" and body == {
        "model": "openclaw/main", "input": "please run TOOLCALL:exec", "stream": True}  # fmt: skip
    assert headers["authorization"] == f"Bearer {TOKEN}"
    assert headers["x-openclaw-session-key"] == "task-3"
    assert path2 == "/tools/invoke" and headers2["authorization"] == f"Bearer {TOKEN}"
    assert body2 == {"tool": "sessions_history",
                     "args": {"sessionKey": "agent:main:task-3", "includeTools": True}}  # fmt: skip


@pytest.mark.parametrize(
    "history",
    [
        http(b'{"ok":false,"error":{"type":"not_found","message":"Tool not available: '
             b'sessions_history"}}', "application/json", "404 Not Found"),
        http(b"<html>", "text/html"),
        http(b'{"ok":true,"result":{"details":{"messages":"x"}}}', "application/json"),
        http(b"x" * (17 << 20), "application/json"),
    ],
)  # fmt: skip
def test_openclaw_history_unread_keeps_the_turn(gateway: StandIn, history: bytes) -> None:
    gateway.history = history
    _deltas, calls, done = split(drive(openclaw(), gateway.port, "hi", "task-3"))
    assert done.ok and calls == [] and done.raw
    note = done.raw["appliance_tool_calls_error"]
    assert note.startswith("ProtocolError: sessions_history: ") and "\n" not in note


CREATED = {"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}}
DELTA = {"type": "response.output_text.delta", "delta": "partial "}
FAILED = {  # as OpenClaw ends an aborted or failed run
    "type": "response.failed",
    "response": {"id": "resp_1", "status": "failed",
                 "error": {"code": "api_error", "message": "internal error"}},
}  # fmt: skip
BIG = {"type": "response.output_text.delta", "delta": "y" * 60000}


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (http(b'{"error":{"message":"Unauthorized","type":"unauthorized"}}', "application/json",
              "401 Unauthorized"),
         "the runtime refused the agent's token (HTTP 401: Unauthorized)"),
        (http(b'{"error":{"message":"Invalid `model`.\\nUse openclaw"}}', "application/json",
              "400 Bad Request"),
         "the runtime answered HTTP 400: Invalid `model`. Use openclaw"),
        (http(b"oops", "text/plain", "502 Bad Gateway"), "the runtime answered HTTP 502: oops"),
        (http(b"<html>hi</html>", "text/html"),
         "the runtime answered text/html, not an event stream"),
        (http(sse(CREATED, DELTA, "{not json")),
         "the runtime sent an event that is not JSON: {not json"),
        (http(sse(CREATED, "[1, 2]")), "the runtime sent an event that is not a JSON object"),
        (http(sse(CREATED, DELTA)), "the runtime's stream ended before the response did"),
        (http(sse(CREATED, "[DONE]")), "the runtime's stream ended before the response did"),
        (http(b""), "the runtime's stream ended before the response did"),
        (http(sse(CREATED) + b"data: " + b"x" * (2 << 20)), "an event over 1048576 bytes"),
        (http(sse(CREATED) + b"data: \xff\xfe\n\n"), "the runtime's stream is not UTF-8"),
        (http(sse({"type": "response.output_text.delta", "delta": 7})),
         "the runtime sent a text delta without text"),
        (http(sse({"type": "response.completed"})),
         "the runtime sent response.completed without its response"),
        (http(sse(*[BIG] * 20)), "the runtime's reply is over 1048576 characters"),
        (http(sse(CREATED, FAILED, "[DONE]")),
         "the runtime failed the turn: internal error (api_error)"),
        (http(sse({"type": "error", "code": "x", "message": "no\nway"})),
         "the runtime failed the turn: no way (x)"),
        (http(sse(CREATED, DELTA)[:40], Content_Length="4000"),
         "the connection to the runtime failed: RemoteProtocolError: "),
    ],
)  # fmt: skip
def test_openclaw_hostile_answers_are_failed_turns(
    gateway: StandIn, answer: bytes, error: str
) -> None:
    gateway.answer = answer
    gateway.history = http(b'{"ok":true,"result":{"details":{"messages":[]}}}', "application/json")
    assert failed(drive(openclaw(), gateway.port, "hi", "s1")).startswith(error)


UNSTREAMABLE = {  # OpenClaw 2026.9.6, when its final reply does not extend what it streamed
    "type": "response.failed",
    "response": {"id": "resp_1", "status": "failed", "usage": {"input_tokens": 9,
                 "output_tokens": 4, "total_tokens": 13},
                 "error": {"code": "server_error", "message": "Assistant output cannot be "
                           "represented as an append-only response stream."}},
}  # fmt: skip


def test_openclaw_reply_it_could_not_stream_is_read_from_the_history(gateway: StandIn) -> None:
    """Seen in CI: the model echoed the timestamp OpenClaw puts before the user's message,
    OpenClaw streamed it then dropped it from the final reply, and failed the completed run."""
    gateway.answer = http(sse(CREATED, {**DELTA, "delta": "[Mon 2026-12-07 20:43 UTC] pong"},
                              UNSTREAMABLE, "[DONE]"))  # fmt: skip
    gateway.history = history_with(
        _run("resp_1", role="assistant", content=[{"type": "text", "text": "pong"}]),
        _run("resp_0", role="assistant", content=[{"type": "text", "text": "earlier"}]),
    )
    _deltas, _calls, done = split(drive(openclaw(), gateway.port, "hi", "s1"))
    assert done.ok and done.text == "pong" and done.error is None
    assert done.usage["total"] == 13 and done.raw and done.raw["appliance_reply_from_history"]


def test_openclaw_unstreamable_reply_missing_from_the_history_fails_the_turn(
    gateway: StandIn,
) -> None:
    gateway.answer = http(sse(CREATED, DELTA, UNSTREAMABLE, "[DONE]"))
    gateway.history = history_with(
        _run("resp_1", role="assistant", content=[{"type": "toolCall", "id": "c", "name": "x"}])
    )
    assert "append-only response stream" in failed(drive(openclaw(), gateway.port, "hi", "s1"))


def test_openclaw_not_ready_and_hung_up() -> None:
    """A gateway still starting (the agent socket drops the connection: nothing listens)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def hang_up() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=hang_up, daemon=True).start()
    runtime = openclaw()
    runtime.ready_timeout_s = 1
    try:
        error = failed(drive(runtime, listener.getsockname()[1], "hi", "s1"))
    finally:
        listener.close()
    # The connection dropped before or after the request went (a race): either is not ready.
    assert re.match(
        r"the runtime was not ready within 1 s \((RemoteProtocolError|ReadError): ", error
    )


def test_openclaw_turn_closed_early_closes_the_gateways_stream(gateway: StandIn) -> None:
    """OpenClaw aborts the run when its HTTP client goes (FINDINGS Q3): closing the events
    must close the connection."""

    def slow(handler: BaseHTTPRequestHandler) -> None:
        handler.wfile.write(http(sse(CREATED)))
        try:
            for _ in range(100):
                handler.wfile.write(sse(DELTA))
                handler.wfile.flush()
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            gateway.disconnected.set()

    gateway.answer = slow
    with httpx.Client(base_url=f"http://127.0.0.1:{gateway.port}", timeout=10) as client:
        turn = openclaw().drive(client, TOKEN, "hi", "s1")
        assert next(turn) == Delta("partial ")
        turn.close()
        assert gateway.disconnected.wait(5), "the gateway never saw the client go"
    assert [p for p, _h, _b in gateway.requests] == ["/v1/responses"]  # no history after it


COMPLETED = {
    "type": "response.completed",
    "response": {
        "id": "resp_1",
        "status": "completed",
        "usage": {"input_tokens": "9", "output_tokens": -1},
    },
}


@pytest.mark.parametrize(
    "after",
    [
        sse("{not json"),  # garbage after the last event
        b"data: \xff\n\n",  # not UTF-8
        sse(*[DELTA] * 40),  # a runtime that goes on talking: not read to its end
    ],
)
def test_what_follows_the_last_event_does_not_undo_the_turn(gateway: StandIn, after: bytes) -> None:
    gateway.answer = http(sse(CREATED, DELTA, COMPLETED) + after)
    gateway.history = http(b'{"ok":true,"result":{"details":{"messages":[]}}}', "application/json")
    deltas, _calls, done = split(drive(openclaw(), gateway.port, "hi", "s1"))
    assert done.ok and deltas == ["partial "] and done.text == "partial "
    assert done.usage == {"input": 0, "output": 0, "cacheRead": 0, "cacheWrite": 0, "total": 0}


def test_a_runtime_never_ready_says_what_it_answered(gateway: StandIn) -> None:
    class NotReady(_Handler):
        def do_GET(self) -> None:
            self.wfile.write(http(b"x" * (1 << 20), "text/plain", "503 Service Unavailable"))

    gateway.RequestHandlerClass = NotReady
    runtime = openclaw()
    runtime.ready_timeout_s = 1
    error = failed(drive(runtime, gateway.port, "hi", "s1"))
    assert error == "the runtime was not ready within 1 s (/readyz answered HTTP 503)"
    assert gateway.requests == []  # no turn was sent
