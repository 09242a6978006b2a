"""The AgentRuntime protocol's two runtimes, without a sandbox: OpenClaw's config rendering, turn
argv and env, result parsing (against a turn recorded from OpenClaw 2026.9.6 in the e2e test) and
session export; the command runtime's turn; the lookup by kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blueprints.catalog import Catalog
from blueprints.errors import BlueprintError
from blueprints.model import Blueprint
from blueprints.runtimes import RUNTIMES, AgentRuntime, Serving, runtime_for
from blueprints.runtimes.command import CommandRuntime
from blueprints.runtimes.openclaw import CONFIG_FILE, OpenClawRuntime, render
from sandbox.compile.podman_spec import AGENT_DIR
from tests.helpers import GOLDEN, assert_golden

RECORDED_TURN = (
    Path(__file__).resolve().parents[1] / "fixtures" / "openclaw" / "agent-local-turn.json"
)
SERVING = Serving(context_tokens=32768, on_vllm=False)


def _command_bp(**runtime: object) -> Blueprint:
    return Blueprint.model_validate(
        {
            "name": "demo",
            "version": "1.0.0",
            "runtime": {"kind": "command", "command": ["sleep", "infinity"], **runtime},
            "image": {"name": "localhost/appliance-base", "digest": "sha256:" + "ab" * 32},
            "sandbox": {"base": "default"},
            "inference": {"timeout_s": 30},
        }
    )


def test_render_types_whole_placeholders_and_leaves_agent_variables() -> None:
    template = {
        "window": "{{context_tokens}}",
        "primary": "inference/{{model}}",
        "token": "${OPENCLAW_GATEWAY_TOKEN}",
        "list": ["{{ model }}", 3, True],
    }
    out = render(template, {"context_tokens": 32768, "model": "default"})
    assert out == {
        "window": 32768,
        "primary": "inference/default",
        "token": "${OPENCLAW_GATEWAY_TOKEN}",
        "list": ["default", 3, True],
    }


def test_render_refuses_an_unknown_placeholder() -> None:
    with pytest.raises(BlueprintError, match=r"unknown placeholder \{\{modle\}\}"):
        render({"a": "{{modle}}"}, {"model": "x"})


def test_the_lookup_gives_each_kind_its_runtime() -> None:
    catalog = Catalog()
    assert set(RUNTIMES) == {"openclaw", "command"}
    openclaw = runtime_for(catalog.get("openclaw"))
    shell = runtime_for(catalog.get("shell"))
    assert isinstance(openclaw, OpenClawRuntime) and isinstance(shell, CommandRuntime)
    runtimes: list[AgentRuntime] = [openclaw, shell]  # both satisfy the protocol (mypy/pyright)
    assert all(r.workspace == "/home/agent/workspace" for r in runtimes)


def test_openclaw_config_for_the_shipped_blueprint() -> None:
    """The shipped blueprint's config as the embedded backend gets it (golden), and the
    served context and reply budget on vLLM."""
    runtime = OpenClawRuntime(Catalog().get("openclaw"))
    files = runtime.agent_files(SERVING)
    assert list(files) == [CONFIG_FILE]
    assert_golden(GOLDEN / "agents" / "openclaw.json", files[CONFIG_FILE])
    config = json.loads(files[CONFIG_FILE])
    assert "{{" not in files[CONFIG_FILE]  # every placeholder filled
    on_vllm = json.loads(runtime.agent_files(Serving(131072, on_vllm=True))[CONFIG_FILE])
    assert on_vllm != config and "131072" in json.dumps(on_vllm) and "4096" in json.dumps(on_vllm)


def test_openclaw_sandbox_runs_no_daemon_and_reads_its_config_read_only() -> None:
    bp = Catalog().get("openclaw")
    runtime = OpenClawRuntime(bp)
    assert runtime.command() == ["sleep", "infinity"]
    assert AGENT_DIR in runtime.policy().filesystem.read_only
    assert AGENT_DIR not in bp.policy().filesystem.read_only  # added by the runtime only


def test_openclaw_turn_argv_and_env() -> None:
    runtime = OpenClawRuntime(Catalog().get("openclaw"))
    turn = runtime.turn("Reply with --json; rm -rf /", "run-1")
    timeout = int(runtime.blueprint.inference.timeout_s)
    assert turn.argv == [
        "openclaw", "agent", "--local", "--agent", "main", "--session-key", "agent:main:run-1",
        "--message", "Reply with --json; rm -rf /", "--json", "--timeout", str(timeout),
    ]  # fmt: skip
    assert turn.timeout_s > timeout  # room for OpenClaw's own start and stop
    assert turn.env["OPENCLAW_OFFLINE"] == "1" and turn.env["OPENCLAW_CONFIG_READONLY"] == "1"
    assert turn.env["OPENCLAW_CONFIG_PATH"] == f"{AGENT_DIR}/{CONFIG_FILE}"
    other = runtime.turn("x", "run-1")
    assert turn.env["OPENCLAW_GATEWAY_TOKEN"] != other.env["OPENCLAW_GATEWAY_TOKEN"]  # fresh


def test_openclaw_reads_a_recorded_turn() -> None:
    record = RECORDED_TURN.read_bytes()
    raw = json.loads(record)
    reply = OpenClawRuntime(Catalog().get("openclaw")).read_turn(0, record, b"")
    assert reply.ok and reply.raw == raw
    assert reply.text == "\n".join(p["text"] for p in raw["payloads"]) and reply.text
    assert reply.session_id == "00f2851c-2b6a-4e19-bda6-63f2e87f4178"
    assert reply.usage["input"] == 5773 and reply.usage["output"] == 256


def test_openclaw_turn_failures_keep_what_there_is() -> None:
    runtime = OpenClawRuntime(Catalog().get("openclaw"))
    record = {
        "payloads": [{"text": "pong", "mediaUrl": None}, {"text": "(truncated)"}],
        "meta": {"agentMeta": {"sessionId": "s1", "usage": {"input": 9000, "output": 2}}},
    }
    reply = runtime.read_turn(0, json.dumps(record).encode(), b"")
    assert reply.ok and reply.text == "pong\n(truncated)" and reply.session_id == "s1"
    assert not runtime.read_turn(1, b"not json", b"boom\n").ok
    assert runtime.read_turn(1, b"not json", b"").raw is None
    assert not runtime.read_turn(0, b'{"payloads": []}', b"").ok  # exit 0 without a reply
    assert not runtime.read_turn(0, b"[1, 2]", b"").ok  # JSON, but not a record
    assert not runtime.read_turn(2, json.dumps(record).encode(), b"").ok  # 2: timed out


def test_openclaw_exports_the_session_it_was_given() -> None:
    export = OpenClawRuntime(Catalog().get("openclaw")).export_session("chat-1")
    assert export is not None and export.argv[:2] == ["sh", "-c"]
    script = export.argv[2]
    assert "--session-key agent:main:chat-1" in script
    assert script.endswith(
        "cat /home/agent/workspace/.openclaw/trajectory-exports/chat-1/events.jsonl"
    )


def test_the_command_runtime() -> None:
    runtime = CommandRuntime(_command_bp())
    assert runtime.command() == ["sleep", "infinity"]
    assert runtime.agent_files(SERVING) is None and runtime.export_session("s") is None
    assert runtime.policy() == runtime.blueprint.policy()
    assert runtime.turn("hi", "s") is None  # no `turn`: it takes no turns

    runtime = CommandRuntime(_command_bp(turn=["sh", "-c", 'echo "$AGENT_MESSAGE"']))
    turn = runtime.turn("hello; $(reboot)", "run-1")
    assert turn is not None and turn.argv == ["sh", "-c", 'echo "$AGENT_MESSAGE"']
    assert turn.env == {"AGENT_MESSAGE": "hello; $(reboot)", "AGENT_SESSION": "run-1"}
    assert turn.timeout_s == 30
    reply = runtime.read_turn(0, b"hello\n", b"")
    assert reply.ok and reply.text == "hello" and reply.raw is None
    assert not runtime.read_turn(3, b"partial", b"err").ok


@pytest.mark.parametrize(
    ("runtime", "error"),
    [
        ({"kind": "command", "command": ["x"], "turn": []}, "non-empty argv"),
        (
            {"kind": "openclaw", "version": "2026.9.6", "integrity": "sha512-" + "A" * 86 + "==",
             "turn": ["x"]},
            "are for kind: command",
        ),
    ],
)  # fmt: skip
def test_a_turn_command_is_checked(runtime: dict, error: str) -> None:
    doc = _command_bp().model_dump(mode="json") | {"runtime": runtime}
    with pytest.raises(ValueError, match=error):
        Blueprint.model_validate(doc)


def test_an_unset_turn_leaves_the_digest_as_it_was() -> None:
    """Deployments made before `runtime.turn` existed keep their pinned digests (rollback)."""
    assert Catalog().get("shell").digest() == (
        "sha256:be9606f8b0224ff7a2660f328b26302015d8944a60f9664a3e4f664b7af78ed1"
    )
    assert _command_bp(turn=["true"]).digest() != _command_bp().digest()
