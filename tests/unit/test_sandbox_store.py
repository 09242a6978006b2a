"""Sandbox records, policy revisions (they outlive the sandbox) and the kill-switch hold."""

from __future__ import annotations

from pathlib import Path

from appliance.store import open_store
from appliance.store.sandbox_store import SandboxStore
from sandbox.policy import Endpoint, Network, Policy


def test_revisions_survive_sandbox_removal(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        boxes = SandboxStore(store)
        boxes.upsert("demo", image="img", command=["sleep", "1"], state="created")
        assert boxes.add_revision("demo", Policy(), "created") == 1
        allowed = Network(allow=[Endpoint(host="registry.npmjs.org")])
        assert boxes.set_network("demo", allowed, "approval 7 persisted") == 2
        boxes.delete("demo")
        assert boxes.get("demo") is None
        rev, policy = boxes.latest_policy("demo")
        assert rev == 2 and policy.network.allow[0].host == "registry.npmjs.org"
        assert [r["reason"] for r in boxes.revisions("demo")] == ["created", "approval 7 persisted"]


def test_upsert_updates_in_place(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        boxes = SandboxStore(store)
        boxes.upsert("a", image="i1", command=["x"], state="created")
        boxes.upsert("a", image="i2", command=["y"], state="running", container_id="c1")
        (record,) = boxes.list()
        assert (record.image, record.command, record.state, record.container_id) == (
            "i2",
            ["y"],
            "running",
            "c1",
        )
        boxes.set_state("a", "stopped")
        assert boxes.get("a").state == "stopped" and boxes.get("a").container_id == "c1"


def test_kill_hold(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        boxes = SandboxStore(store)
        assert boxes.held() is None
        boxes.hold("incident 42")
        assert boxes.held() == "incident 42"
        boxes.release()
        assert boxes.held() is None
