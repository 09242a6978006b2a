"""Agent turns through a real control plane (`appliance serve control`) on real sandboxes: an
exec turn and an always-on runtime's turns streamed through the API and the CLI, refusals (the
kill switch's hold, a stopped agent, a spent daily budget), a client that hangs up cancelling
the turn in the runtime, and what the transcript and the audit log say of each (trigger, actor).

`kind: command` blueprints on the base image keep this cheap (no model): `echoer` runs one
command per turn; `served` is tests/fixtures/responses_server.py kept up by the supervisor.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.agent_fixtures import (
    DISCONNECT_LOG,
    agent_audit,
    api_client,
    catalog_env,
    remove_agents,
    run_cli,
    sandbox_root,
)
from tests.control_fixtures import running_control_plane

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def plane() -> Iterator[dict[str, str]]:
    with sandbox_root() as root:
        env = catalog_env(root)
        with running_control_plane(env, root / "s"):
            yield env
            remove_agents(env)


def _stream(client: httpx.Client, name: str, body: dict) -> tuple[int, list[dict]]:
    """A streamed turn's status and its NDJSON events (or the error body, as one)."""
    with client.stream("POST", f"/agents/{name}/turns", json={**body, "stream": True}) as r:
        r.read()
        if r.status_code != 200:
            return r.status_code, [r.json()]
        assert r.headers["content-type"].startswith("application/x-ndjson")
        return r.status_code, [json.loads(line) for line in r.text.splitlines()]


def test_an_exec_turn_streams_through_the_api_and_therun_cli(plane: dict[str, str]) -> None:
    """A runtime without a service: its exec turn is one delta, then the done record; the
    transcript and the audit log say who asked and how (trigger, actor)."""
    name = f"stream-{os.getpid()}"
    with api_client(plane) as client:
        assert client.post("/agents", json={"name": name, "blueprint": "echoer"}).status_code == 201
        message = 'line one\n{"type": "done"}'  # NDJSON-framed as a string: one event still
        status, events = _stream(client, name, {"message": message, "session": "s-2"})
    assert status == 200, events
    assert [e["type"] for e in events] == ["delta", "done"]
    assert events[0]["text"] == f"s-2|{message}"
    done = events[1]
    assert done["ok"] is True and done["exit_code"] == 0 and done["reply"] == f"s-2|{message}"
    assert done["trigger"] == "manual" and done["actor"] == f"uid:{os.geteuid()}"
    assert done["tool_calls"] == [] and done["cancelled"] is False
    assert done["tokens"] == {
        "prompt": 0,
        "completion": 0,
        "total": 0,
        "model_time_s": 0.0,
        "requests": 0,
        "overlapping": False,
    }  # fmt: skip  (an echo makes no model call)

    out = run_cli(plane, "agent", "run", name, "via the cli", "--session", "s-2")
    assert (out.returncode, out.stdout) == (0, "s-2|via the cli\n"), out.stderr
    [first, second] = json.loads(run_cli(plane, "agent", "transcript", name, "--json").stdout)
    assert first["message"] == message and second["message"] == "via the cli"
    for line in (first, second):
        assert line["trigger"] == "manual" and line["actor_kind"] == "unix"
        assert line["actor"] == f"uid:{os.geteuid()}" and line["session"] == "s-2"
        assert line["ok"] is True and "stderr_tail" not in line and line["duration_s"] > 0
    turns = [r for r in agent_audit(plane, name) if r["event"] == "agent.turn"]
    assert [(r["trigger"], r["ok"]) for r in turns] == [("manual", True), ("manual", True)]
    assert run_cli(plane, "agent", "rm", name).returncode == 0


def test_turns_are_refused_while_held_stopped_or_over_budget(plane: dict[str, str]) -> None:
    """Each refusal: a 409 `turn_refused` before any byte of a stream, exit 12 with the reason
    and a hint from the CLI, a transcript line and an agent.turn record saying why."""
    from appliance.store.inference_store import InferenceStore
    from inference.ports import UsageRecord

    name = f"gate-{os.getpid()}"
    state = Path(plane["APPLIANCE_STATE_DIR"])
    assert run_cli(plane, "agent", "create", name, "--blueprint", "echoer").returncode == 0

    def refused(reason: str, hint: str) -> None:
        with api_client(plane) as client:
            status, [body] = _stream(client, name, {"message": "hi"})
        assert status == 409 and body["error"]["type"] == "turn_refused", body
        assert reason in body["error"]["message"] and hint in body["error"]["hint"]
        out = run_cli(plane, "agent", "run", name, "hi")
        assert out.returncode == 12 and out.stdout == "", out.stderr
        error, hint_line = out.stderr.strip().splitlines()
        assert error.startswith("appliance: error: ") and reason in error
        assert hint in hint_line

    try:
        assert run_cli(plane, "kill", name, "--hold").returncode == 0
        refused("the kill switch holds every sandbox", "`appliance release`")
    finally:
        assert run_cli(plane, "release").returncode == 0
    refused(f"{name} is stopped", f"`appliance agent start {name}`")  # the kill stopped it
    assert run_cli(plane, "agent", "start", name).returncode == 0
    assert run_cli(plane, "agent", "run", name, "back").returncode == 0

    key = f"sandbox-{name}"
    assert run_cli(plane, "budget", "set", key, "--daily-tokens", "10").returncode == 0
    with InferenceStore(state) as inference:  # what the gateway logs for a model call
        record = inference.find_key(key)
        assert record is not None
        inference.record_usage(UsageRecord(record.id, "m", 8, 4, 0.5, 200, False))
    refused(f"{name} is over its daily budget: 12 of 10 tokens", f"budget set {key}")

    lines = json.loads(run_cli(plane, "agent", "transcript", name, "--json").stdout)
    reasons = [line.get("refused") for line in lines]
    assert [r is None for r in reasons] == [False] * 4 + [True] + [False] * 2, reasons
    assert all(line["trigger"] == "manual" and line["actor_kind"] == "unix" for line in lines)
    turns = [r for r in agent_audit(plane, name) if r["event"] == "agent.turn"]
    assert [bool(r.get("refused")) for r in turns] == [True] * 4 + [False] + [True] * 2
    listed = json.loads(run_cli(plane, "agent", "list", "--json").stdout)
    assert [r["turns"] for r in listed if r["name"] == name] == [1]  # refusals are no turns
    assert run_cli(plane, "agent", "rm", name).returncode == 0


def _ready(env: dict[str, str], name: str) -> None:
    """A turn answers once the supervisor reports the runtime running (a turn before is
    refused with the runtime's state: that is the gate, not a failure)."""
    deadline = time.monotonic() + 60
    while True:
        with api_client(env) as client:
            status, events = _stream(client, name, {"message": "ready?", "session": "probe"})
        if status == 200:
            assert events[-1]["ok"] is True, events[-1]
            return
        error = events[0]["error"]
        assert error["type"] == "turn_refused" and "runtime is" in error["message"], error
        assert time.monotonic() < deadline, error
        time.sleep(0.5)


def test_an_always_on_runtime_streams_keeps_sessions_and_is_cancelled_by_a_hang_up(
    plane: dict[str, str],
) -> None:
    name = f"served-{os.getpid()}"
    made = run_cli(plane, "agent", "create", name, "--blueprint", "served")
    assert made.returncode == 0, made.stderr
    _ready(plane, name)
    with api_client(plane) as client:
        status, events = _stream(client, name, {"message": "hello there", "session": "s-1"})
        assert status == 200, events
        deltas = [e["text"] for e in events if e["type"] == "delta"]
        assert len(deltas) > 1 and "".join(deltas) == "s-1|1|hello there"  # as it streamed
        done = events[-1]
        assert done["ok"] is True and done["reply"] == "s-1|1|hello there"
        assert done["exit_code"] is None and done["trigger"] == "manual"
        assert done["usage"]["input"] == len("hello there")  # as the runtime reported it
        # The same runtime answers the session's next turn: it kept the session (no new process).
        whole = client.post(f"/agents/{name}/turns", json={"message": "again", "session": "s-1"})
        assert whole.status_code == 200 and whole.json()["reply"] == "s-1|2|again"
    out = run_cli(plane, "agent", "run", name, "from the cli", "--session", "s-1")
    assert (out.returncode, out.stdout) == (0, "s-1|3|from the cli\n"), out.stderr

    # A client that hangs up mid-reply: the runtime sees its request go, the turn is cancelled.
    with (
        api_client(plane) as client,
        client.stream(
            "POST",
            f"/agents/{name}/turns",
            json={"message": "SLOW", "session": "s-2", "stream": True},
        ) as response,
    ):
        assert json.loads(next(response.iter_lines())) == {"type": "delta", "text": " tick"}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        log = run_cli(plane, "sandbox", "exec", name, "--", "cat", DISCONNECT_LOG)
        if "disconnected s-2" in log.stdout:
            break
        time.sleep(0.5)
    assert "disconnected s-2" in log.stdout, (log.stdout, log.stderr)
    transcript = json.loads(run_cli(plane, "agent", "transcript", name, "--json").stdout)
    [cut] = [t for t in transcript if t["session"] == "s-2"]
    assert cut["cancelled"] is True and cut["ok"] is False and cut["reply"].startswith(" tick")
    assert len(cut["reply"].split()) < 10  # not the 60 s reply
    turns = [r for r in agent_audit(plane, name) if r["event"] == "agent.turn"]
    assert [r.get("cancelled") for r in turns if r["session"] == "s-2"] == [True]
    assert run_cli(plane, "agent", "rm", name).returncode == 0
