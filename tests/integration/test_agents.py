"""Agents from blueprints on real sandboxes: create, upgrade keeping state and approvals, a failed
upgrade that restores the old version, rollback, and the digest pin.

Uses the generic runtime (`kind: command`) so it runs without the OpenClaw image; the OpenClaw
turn is tested end to end in tests/e2e.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

from appliance.config import load_config
from appliance.control.agent_manager import AgentError, AgentManager
from appliance.control.wiring import sandbox_manager
from appliance.ops.status import agents_section
from appliance.packaging.images import ImageMismatch
from appliance.store import open_store
from appliance.store.inference_store import InferenceStore
from sandbox.images.base import recipe_digest
from sandbox.policy import Endpoint
from tests.sandbox_fixtures import ensure_base_image, sandbox_skip_reason

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def blueprint(version: str, **over) -> dict:
    doc = {
        "name": "worker",
        "version": version,
        "runtime": {"kind": "command", "command": ["sleep", "infinity"]},
        "image": {"name": "localhost/appliance-base", "digest": recipe_digest()},
        "sandbox": {"base": "default"},
        "budgets": {"daily_tokens": 1000},
    }
    doc.update(over)
    return doc


@pytest.fixture
def manager():
    if (why := sandbox_skip_reason()) is not None:
        pytest.skip(why)
    ensure_base_image()
    root = Path(tempfile.mkdtemp(prefix="ag-"))  # short: unix socket paths live under it
    catalog = root / "bp"
    for version, over in [
        ("1.0.0", {}),
        ("1.1.0", {"resources": {"memory": "1g", "pids": 128, "cpus": 1},
                   "inference": {"model": "default", "allowed_models": ["big"]}}),
        # Starts and is refused: Landlock hard_requirement with a required path that is absent.
        ("1.2.0", {"sandbox": {"base": "default", "additions": {
            "filesystem": {"read_only": ["/nonexistent"]}}}}),
        ("1.3.0", {"image": {"name": "x", "digest": "sha256:" + "0" * 64}}),
    ]:  # fmt: skip
        path = catalog / "worker" / version / "blueprint.yaml"
        path.parent.mkdir(parents=True)
        path.write_text(yaml.safe_dump(blueprint(version, **over)))
    config = load_config({"state_dir": str(root / "s"), "blueprints": {"dirs": [str(catalog)]}})
    with open_store(config.state_dir) as store:
        m = AgentManager(config, store, sandbox_manager(config, store))
        yield m
        for name in m.agents.agents():
            m.remove(name)
    shutil.rmtree(root, ignore_errors=True)


def _name(tag: str) -> str:
    return f"ag-{tag}-{os.getpid()}"


def _key_models(m: AgentManager, name: str) -> tuple[str, ...] | None:
    """The model allowlist of the agent's live sandbox key, as the gateway will read it."""
    record = m.sandboxes.boxes.get(name)
    assert record is not None and record.key_id is not None
    with InferenceStore(m.config.state_dir) as inference:
        key = inference.find_key(record.key_id)
    assert key is not None and key.revoked_at is None
    return key.allowed_models


def _home_file(m: AgentManager, name: str) -> bytes:
    code, out, _ = m.sandboxes.exec(name, ["cat", "/home/agent/state.txt"])
    return out if code == 0 else b""


def test_create_records_the_blueprint_and_sets_the_budget(manager: AgentManager) -> None:
    name = _name("create")
    dep = manager.create(name, "worker@1.0.0")
    assert (dep.ref, dep.outcome) == ("worker@1.0.0", "active")
    assert dep.digest == manager.blueprint("worker@1.0.0").digest()
    [row] = [r for r in manager.inventory() if r["name"] == name]
    assert row["state"] == "running" and row["daily_budget"] == 1000
    assert _key_models(manager, name) == ("default",)  # deny by default: only `model`
    assert manager.sandboxes.enforcement(name)["landlock"]["enforced"] is True
    section = agents_section(manager.config, None)  # what `appliance status` shows
    [shown] = [a for a in section["agents"] if a["name"] == name]
    assert shown["blueprint"] == "worker@1.0.0" and shown["uptime_s"] >= 0


def test_upgrade_keeps_home_and_approvals_then_rollback(manager: AgentManager) -> None:
    name = _name("upgrade")
    manager.create(name, "worker@1.0.0")
    manager.sandboxes.exec(name, ["sh", "-c", "echo kept > /home/agent/state.txt"])
    network = manager.sandboxes.policy(name)[1].network
    approved = Endpoint(host="approved.example", ports=[443])
    manager.sandboxes.apply_network(
        name, network.model_copy(update={"allow": [*network.allow, approved]}), "approval"
    )
    old_container = manager.sandboxes.container(name).id

    dep = manager.upgrade(name, "worker@1.1.0")

    assert dep.ref == "worker@1.1.0"
    assert _key_models(manager, name) == ("big", "default")  # the new blueprint's list
    assert manager.sandboxes.container(name).id != old_container  # re-created
    assert manager.sandboxes.policy(name)[1].resources.pids == 128
    assert _home_file(manager, name) == b"kept\n"
    assert approved in manager.sandboxes.policy(name)[1].network.allow

    back = manager.rollback(name)
    assert back.ref == "worker@1.0.0"
    assert _key_models(manager, name) == ("default",)
    assert _home_file(manager, name) == b"kept\n"
    assert [d.ref for d in manager.agents.history(name)] == [
        "worker@1.0.0",
        "worker@1.1.0",
        "worker@1.0.0",
    ]


@pytest.mark.parametrize(("version", "error"), [("1.2.0", AgentError), ("1.3.0", AgentError)])
def test_a_failed_upgrade_restores_the_old_version(
    manager: AgentManager, version: str, error: type[Exception]
) -> None:
    name = _name(f"fail{version.replace('.', '')}")
    manager.create(name, "worker@1.0.0")
    manager.sandboxes.exec(name, ["sh", "-c", "echo kept > /home/agent/state.txt"])
    with pytest.raises(error, match=r"is back on worker@1\.0\.0"):
        manager.upgrade(name, f"worker@{version}")
    assert manager.agents.current(name).ref == "worker@1.0.0"
    assert manager.sandboxes.boxes.get(name).state == "running"
    assert _home_file(manager, name) == b"kept\n"


def test_an_unknown_image_digest_starts_nothing(manager: AgentManager) -> None:
    name = _name("digest")
    with pytest.raises(ImageMismatch, match="no local image has this digest"):
        manager.create(name, "worker@1.3.0")
    assert manager.sandboxes.boxes.get(name) is None
    assert manager.agents.current(name) is None
