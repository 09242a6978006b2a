"""Agent pieces that need no sandbox: the key's models, deployment history (the runtimes'
config rendering and turn parsing: test_agent_runtimes.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from appliance.control.agent_manager import key_models
from appliance.store import open_store
from appliance.store.agent_store import AgentStore
from blueprints.model import Blueprint


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


def test_the_control_plane_takes_references_and_text_never_a_path(tmp_path: Path) -> None:
    """The control plane runs as root: whoever asks, a path is refused before anything is
    opened (a file is the CLI's to read, as the operator; it sends the text)."""
    from appliance.control.agents import blueprint_source
    from appliance.errors import ConfigError

    secret = tmp_path / "secret.yaml"
    secret.write_text("hunter2: 1\n")
    for ref in ("openclaw", "openclaw@1.0.0", "1.1.0"):
        assert blueprint_source(ref, None, "") == ref
    for path in (str(secret), "/etc/shadow", "../../etc/x", "bp/x.yaml", "x.yml"):
        with pytest.raises(ConfigError, match="not a file path") as info:
            blueprint_source(path, None, "")
        assert "hunter2" not in str(info.value)
    text = yaml.safe_dump(_bp().model_dump(mode="json"))
    parsed = blueprint_source(None, text, "mine.yaml")
    assert isinstance(parsed, Blueprint) and parsed.digest() == _bp().digest()
    with pytest.raises(ConfigError, match=r"^mine.yaml:3:"):
        blueprint_source(None, "name: x\nversion: [\n", "mine.yaml")
