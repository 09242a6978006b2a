"""Agent pieces that need no sandbox: the key's models, deployment history (the runtimes'
config rendering and turn parsing: test_agent_runtimes.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

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


def test_a_blueprint_file_only_from_a_local_admin_and_only_absolute() -> None:
    """The control plane reads a blueprint file as root: a token operator names catalog
    blueprints only; a relative path (the control plane's cwd, not the operator's) is refused."""
    from appliance.control.agents import blueprint_ref
    from appliance.control.api.deps import Principal
    from appliance.errors import AuthError, ConfigError

    peer = Principal("unix", "uid:0", "admin", uid=0, pid=1)
    token = Principal("token", "ops", "admin")
    for ref in ("openclaw", "openclaw@1.0.0"):
        assert blueprint_ref(peer, ref) == ref and blueprint_ref(token, ref) == ref
    assert blueprint_ref(peer, "/srv/bp/x.yaml") == "/srv/bp/x.yaml"
    with pytest.raises(AuthError, match="only over the control plane's unix socket"):
        blueprint_ref(token, "/etc/shadow.yaml")
    with pytest.raises(AuthError):
        blueprint_ref(token, "../../etc/x")  # a '/' makes it a path
    with pytest.raises(ConfigError, match="is relative"):
        blueprint_ref(peer, "bp/x.yaml")
