"""Agent pieces that need no sandbox: config rendering, turn parsing, deployment history."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.agents import _turn_result, key_models, render
from appliance.errors import ConfigError
from appliance.store import open_store
from appliance.store.agent_store import AgentStore
from blueprints.model import Blueprint


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
    with pytest.raises(ConfigError, match=r"unknown placeholder \{\{modle\}\}"):
        render({"a": "{{modle}}"}, {"model": "x"})


def test_turn_result_reads_openclaws_record() -> None:
    record = {
        "payloads": [{"text": "pong", "mediaUrl": None}, {"text": "(truncated)"}],
        "meta": {"agentMeta": {"sessionId": "s1", "usage": {"input": 9000, "output": 2}}},
    }
    result = _turn_result("demo", "run-1", 0, json.dumps(record).encode(), b"", 12.5)
    assert result.ok and result.reply == "pong\n(truncated)" and result.session_id == "s1"
    assert result.usage == {"input": 9000, "output": 2} and result.session == "run-1"


def test_turn_result_failure_keeps_the_error() -> None:
    result = _turn_result("demo", "run-1", 1, b"not json", b"boom\n", 1.0)
    assert not result.ok and result.reply == "" and result.stderr_tail == "boom\n"
    result = _turn_result("demo", "run-1", 0, b'{"payloads": []}', b"", 1.0)
    assert not result.ok  # exit 0 without a reply is not a turn


def test_deployments_give_current_and_previous(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        agents = AgentStore(store)
        agents.deploy("a", "bp", "1.0.0", "sha256:1", "img1", "created")
        agents.deploy("a", "bp", "1.1.0", "sha256:2", "img2", "upgrade")
        assert agents.current("a").version == "1.1.0"
        assert agents.previous("a").version == "1.0.0"
        assert agents.agents() == ["a"]
        assert [d.outcome for d in agents.history("a")] == ["replaced", "active"]
        agents.forget("a")
        assert agents.current("a") is None


def _bp(**inference: object) -> Blueprint:
    return Blueprint.model_validate(
        {
            "name": "demo",
            "version": "1.0.0",
            "runtime": {"kind": "command", "command": ["sleep", "infinity"]},
            "image": {"name": "localhost/appliance-base", "digest": "sha256:" + "ab" * 32},
            "sandbox": {"base": "default"},
            "inference": inference,
        }
    )


def test_key_models_are_the_model_and_the_allowed_ones() -> None:
    assert key_models(_bp()) == ["default"]  # empty allowed_models: only `model`
    assert key_models(_bp(model="smol")) == ["smol"]
    bp = _bp(model="default", allowed_models=["big", "default"])
    assert key_models(bp) == ["big", "default"]
