"""Turns streamed through the control plane (no Podman; tests/turn_fixtures.py): a client that
hangs up cancels the turn in the runtime (mid-reply, while the runtime is silent or not ready
yet, or waiting for a whole answer), a turn closed early or before it ran is recorded cancelled,
streams hold their lane slots, and the CLI prints the reply as it streams (`agent run`, `agent
chat`), with no escape sequence of the agent's reaching a terminal."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.control import turns as turns_module
from appliance.control.api import lanes
from blueprints.model import Blueprint
from blueprints.runtimes.command import CommandRuntime
from tests.turn_fixtures import AGENT, APPLIANCE, NOTICE, World, reply_events, turn_world


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    with turn_world(tmp_path, monkeypatch) as made:
        yield made


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
    world.script.events, world.script.pause_s = reply_events("again"), 0.0
    again = world.api.post(f"/agents/{AGENT}/turns", json={"message": "x"})
    assert again.json()["reply"] == "again"


def test_a_hang_up_while_the_runtime_is_silent_cancels_at_once(world: World) -> None:
    """No event to notice the hang-up at: the control plane cuts the runtime's connection the
    moment its client goes, not when the runtime next speaks (here: 30 s later)."""
    world.script.silence_s = 30.0
    world.script.events = reply_events("too late")
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


def _served_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """Turns driven by a real adapter (a `kind: command` with `serve:`: /readyz, then SSE)."""
    served = Blueprint.model_validate(
        {
            "name": "served",
            "version": "1.0.0",
            "runtime": {"kind": "command", "command": ["x"], "serve": {"port": 8080}},
            "image": {"name": "localhost/appliance-base", "digest": "sha256:" + "ab" * 32},
            "sandbox": {"base": "default"},
        }
    )
    monkeypatch.setattr(turns_module, "runtime_for", lambda _bp: CommandRuntime(served))


def test_a_real_adapters_turn_cut_off_mid_reply_is_cancelled(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The adapter reads the cut connection as a failed turn: recorded cancelled, not failed."""
    _served_command(monkeypatch)
    world.script.sse, world.script.pause_s = True, 0.05
    world.script.events = [
        {"type": "response.output_text.delta", "delta": f"{i} "} for i in range(200)
    ]
    body = {"message": "count", "session": "s-11", "stream": True}
    with world.api.stream("POST", f"/agents/{AGENT}/turns", json=body) as response:
        assert json.loads(next(response.iter_lines())) == {"type": "delta", "text": "0 "}
    assert world.script.hung_up.wait(5), "the runtime's stream was not closed"
    deadline = time.monotonic() + 5
    while not world.transcript() and time.monotonic() < deadline:
        time.sleep(0.05)
    [line] = world.transcript()
    assert line["cancelled"] is True and line["error"] == "cancelled: the client went away"
    assert line["reply"].startswith("0 ")


def test_a_hang_up_while_the_runtime_is_not_ready_frees_the_slot_at_once(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real adapter waiting for its runtime (/readyz 503, for up to 120 s): the hang-up ends
    the wait, the turn never reaches the runtime, its lane slot is back within a second."""
    _served_command(monkeypatch)
    world.script.ready_status = 503
    body = {"message": "hi", "session": "s-9", "stream": True}
    with world.api.stream("POST", f"/agents/{AGENT}/turns", json=body) as response:
        assert response.status_code == 200
        deadline = time.monotonic() + 5
        while world.script.ready_checks < 2:  # it is waiting for the runtime
            assert time.monotonic() < deadline, "the runtime was never asked if it is ready"
            time.sleep(0.02)
        hung_up_at = time.monotonic()
    while lanes.TURNS._running and time.monotonic() - hung_up_at < 5:  # the slots in use
        time.sleep(0.02)
    assert time.monotonic() - hung_up_at < 1.2, "the turn's lane slot was not given back"
    [line] = world.transcript()
    assert line["cancelled"] is True and line["error"] == "cancelled: the client went away"
    checks = world.script.ready_checks
    time.sleep(1.0)
    assert world.script.ready_checks == checks and world.script.requests == []  # no POST


def test_a_turn_answered_whole_is_cancelled_when_its_client_hangs_up(world: World) -> None:
    """Not streamed: the control plane watches for the disconnect all the same."""
    world.script.silence_s = 30.0
    world.script.events = reply_events("too late")
    body = {"message": "think", "session": "s-10"}
    with pytest.raises(httpx.ReadTimeout):
        world.api.post(f"/agents/{AGENT}/turns", json=body, timeout=httpx.Timeout(10, read=1))
    assert world.script.hung_up.wait(5), "the runtime's connection was not cut"
    deadline = time.monotonic() + 5
    while not world.transcript() and time.monotonic() < deadline:
        time.sleep(0.05)
    [line] = world.transcript()
    assert line["cancelled"] is True and line["session"] == "s-10"
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
    world.script.events = reply_events("never asked")
    world.plane.turns.start(None, AGENT, "go", "s-7").close()
    [line] = world.transcript()
    assert line["cancelled"] is True and line["session"] == "s-7" and line["reply"] == ""
    assert world.script.requests == []  # the runtime was never asked


def test_streams_hold_their_lane_slots_until_they_end(world: World) -> None:
    """Eight slow streams take the lane's eight slots; a ninth turn is refused (429) at once;
    when they end, turns run again."""
    from appliance.control.api import lanes

    world.script.events = [*reply_events(*"." * 40)]
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
    world.script.events, world.script.pause_s = reply_events("free"), 0.0
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


HOSTILE = ("safe \x1b]52;c;ZXZpbA==\x07text", "\x1b[2J\x1b[31m end\x9b2J\r\x08!\x1bc\t.")


def test_agent_run_keeps_the_agents_escape_sequences_off_a_terminal(world: World) -> None:
    """A reply that would set the clipboard (OSC 52), clear the screen, colour it, move the
    cursor back: to a terminal, the text only; to a pipe, as the agent wrote it."""
    world.script.events = reply_events(*HOSTILE)
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [APPLIANCE, "agent", "run", AGENT, "go"],
        env=world.env, stdout=follower, stderr=subprocess.PIPE,
    )  # fmt: skip
    os.close(follower)
    out = b""
    try:
        while select.select([leader], [], [], 30)[0]:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the command ended, the terminal is closed
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        os.close(leader)
    assert out == b"safe text end2J!\t.\r\n"  # (the terminal writes \n as \r\n)
    piped = subprocess.run(
        [APPLIANCE, "agent", "run", AGENT, "again"], env=world.env, capture_output=True, timeout=60
    )
    assert piped.returncode == 0 and piped.stdout == ("".join(HOSTILE) + "\n").encode()


def test_agent_chat_streams_each_line_in_one_session(world: World) -> None:
    world.script.events = reply_events("one ", "reply")
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


def test_agent_chat_goes_on_after_a_refused_line(world: World) -> None:
    """A refusal in a chat is one line with its hint; the chat goes on (it may be released)."""
    world.runtime.update(state="fail_closed", reason="control plane silent for 130 s")
    chat = subprocess.run(
        [APPLIANCE, "agent", "chat", AGENT],
        env=world.env, input="hello\nagain\n", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    refused = f"refused: {AGENT}'s runtime is fail_closed: control plane silent for 130 s\n"
    assert chat.stdout.count(refused) == 2, chat.stdout
    assert chat.stdout.count(f"hint: `appliance agent logs {AGENT}`") == 2
    assert world.script.requests == [] and len(world.transcript()) == 2
