"""Which blueprint a deployment runs, without a sandbox: each deployment stores its blueprint's
canonical form; one a client sent as text that the catalog does not have (a file) is given back
from that copy (checked against its digest), a catalog one by name@version as before (a catalog
blueprint edited in place is still caught by rollback's pin)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance.config import load_config
from appliance.control.agent_manager import AgentManager
from appliance.errors import ApplianceError, ConfigError, NotFoundError
from appliance.store import open_store
from appliance.store.agent_store import AgentStore, Deployment
from blueprints.catalog import Catalog
from blueprints.errors import BlueprintChanged, BlueprintError
from blueprints.model import Blueprint
from blueprints.resolve import restore_pinned


def _doc(name: str = "worker", version: str = "1.0.0", **over: object) -> dict:
    doc = {
        "name": name,
        "version": version,
        "runtime": {"kind": "command", "command": ["sleep", "infinity"], "turn": ["echo", "hi"]},
        "image": {"name": "localhost/appliance-base", "digest": "sha256:" + "ab" * 32},
        "sandbox": {"base": "default"},
        "budgets": {"daily_tokens": 1000},
    }
    return doc | over


def _write(catalog: Path, doc: dict) -> Path:
    path = catalog / doc["name"] / doc["version"] / "blueprint.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[AgentManager]:
    """A manager over a one-blueprint catalog (worker@1.0.0); no sandbox is touched here."""
    catalog = tmp_path / "bp"
    _write(catalog, _doc())
    config = load_config({"state_dir": str(tmp_path / "s"), "blueprints": {"dirs": [str(catalog)]}})
    with open_store(config.state_dir) as store:
        yield AgentManager(config, store, sandboxes=None)  # type: ignore[arg-type]


def _deploy(m: AgentManager, agent: str, bp: Blueprint) -> Deployment:
    """What AgentManager._deploy records, without the sandbox it makes first."""
    origin = m.origin(bp)
    m.agents.deploy(
        agent,
        bp.name,
        bp.version,
        bp.digest(),
        "img",
        "test",
        origin=origin,
        blueprint_json=bp.canonical(),
    )
    current = m.agents.current(agent)
    assert current is not None
    return current


def test_the_canonical_form_gives_the_same_blueprint_and_digest() -> None:
    builtin = [Catalog().get(f"{e.name}@{e.version}") for e in Catalog().entries()]
    no_turn = Blueprint.model_validate(_doc(runtime={"kind": "command", "command": ["true"]}))
    for bp in [*builtin, Blueprint.model_validate(_doc()), no_turn]:
        back = Blueprint.model_validate_json(bp.canonical())
        assert back == bp and back.digest() == bp.digest(), bp.ref
    assert builtin, "the built-in catalog has blueprints"


def test_a_stored_copy_that_does_not_match_its_digest_is_refused() -> None:
    bp = Blueprint.model_validate(_doc())
    assert restore_pinned(bp.canonical(), bp.digest()) == bp
    tampered = json.loads(bp.canonical())
    tampered["budgets"]["daily_tokens"] = 10**9
    with pytest.raises(BlueprintChanged, match=r"stored copy of worker@1\.0\.0 does not match"):
        restore_pinned(json.dumps(tampered), bp.digest())
    for broken in ("{", json.dumps({**tampered, "extra": 1}), "[]"):
        with pytest.raises(BlueprintError, match=r"stored blueprint .* no longer valid"):
            restore_pinned(broken, bp.digest())


def test_the_store_keeps_the_origin_and_the_blueprint(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        agents = AgentStore(store)
        with pytest.raises(ValueError, match="with its blueprint_json"):
            agents.deploy("a", "bp", "1.0.0", "sha256:1", "img", "created", origin="client")
        with pytest.raises(ValueError, match="origin 'file'"):
            hostile: Any = "file"
            agents.deploy("a", "bp", "1.0.0", "sha256:1", "img", "created", origin=hostile)
        assert agents.history("a") == []  # neither refused deployment left a row
        agents.deploy("a", "bp", "1.0.0", "sha256:1", "img", "created")
        agents.deploy(
            "a", "bp", "1.1.0", "sha256:2", "img", "upgrade", origin="client", blueprint_json="{}"
        )
        first, second = agents.history("a")
        assert (first.origin, first.blueprint_json) == ("catalog", None)
        assert (second.origin, second.blueprint_json) == ("client", "{}")
        # A row written before the columns existed reads as the catalog's, as it was deployed.
        store.conn.execute(
            "INSERT INTO agent_deployments (agent, blueprint, version, digest, image, outcome, "
            "reason, created_at) VALUES ('old', 'bp', '1.0.0', 'sha256:1', 'i', 'active', 'x', 0)"
        )
        old = agents.current("old")
        assert old is not None and (old.origin, old.blueprint_json) == ("catalog", None)
        with pytest.raises(Exception, match="CHECK constraint"):
            store.conn.execute("UPDATE agent_deployments SET origin = 'elsewhere'")


def test_origin_is_the_catalog_only_for_the_catalog_s_very_blueprint(
    manager: AgentManager,
) -> None:
    assert manager.origin(manager.blueprint("worker@1.0.0")) == "catalog"
    assert manager.origin(Blueprint.model_validate(_doc())) == "catalog"  # the same text
    # Same name@version as the catalog's, other contents: the file's, not the catalog's.
    assert manager.origin(Blueprint.model_validate(_doc(description="mine"))) == "client"
    assert manager.origin(Blueprint.model_validate(_doc("filed"))) == "client"
    assert manager.origin(Blueprint.model_validate(_doc(version="9.0.0"))) == "client"


def test_a_file_blueprint_is_given_back_from_its_stored_copy(manager: AgentManager) -> None:
    """Not in the catalog (or shadowing a catalog entry): its turns, a failed upgrade's return
    and rollback use the blueprint that was deployed."""
    v1 = Blueprint.model_validate(_doc("filed"))
    v2 = Blueprint.model_validate(_doc("filed", "1.1.0", budgets={"daily_tokens": 5}))
    dep1 = _deploy(manager, "ag", v1)
    assert dep1.origin == "client" and manager.deployed(dep1) == v1
    assert manager.upgrade_target("ag", v2) == v2
    dep2 = _deploy(manager, "ag", v2)
    assert manager.deployed(dep2) == v2
    assert manager.rollback_target("ag") == v1

    shadow = Blueprint.model_validate(_doc(description="mine"))  # worker@1.0.0, not the catalog's
    dep = _deploy(manager, "sh", shadow)
    assert manager.deployed(dep) == shadow != manager.blueprint("worker@1.0.0")


def test_a_file_blueprint_upgrades_only_to_another_file(manager: AgentManager) -> None:
    _deploy(manager, "ag", Blueprint.model_validate(_doc("filed")))
    for to in (None, "1.1.0", "filed@1.1.0"):
        with pytest.raises(NotFoundError, match=r"runs filed@1\.0\.0 from a file") as info:
            manager.upgrade_target("ag", to)
        assert (
            info.value.hint
            == "pass the new version's file: `appliance blueprint upgrade ag --to FILE`"
        )


def test_a_tampered_or_incompatible_stored_copy_is_an_error(manager: AgentManager) -> None:
    bp = Blueprint.model_validate(_doc("filed"))
    dep = _deploy(manager, "ag", bp)
    tampered = json.loads(bp.canonical()) | {"description": "changed"}
    with pytest.raises(ApplianceError, match="does not match its digest"):
        manager.deployed(replace(dep, blueprint_json=json.dumps(tampered)))
    newer = Blueprint.model_validate(_doc("filed", min_appliance_version="99.0.0"))
    pinned = replace(dep, blueprint_json=newer.canonical(), digest=newer.digest())
    with pytest.raises(ConfigError, match=r"needs appliance >= 99\.0\.0"):
        manager.deployed(pinned)


def test_a_catalog_blueprint_edited_in_place_is_still_caught_by_rollback(
    manager: AgentManager, tmp_path: Path
) -> None:
    """Catalog deployments resolve through the catalog as before: rollback's pin holds."""
    _deploy(manager, "ag", manager.blueprint("worker@1.0.0"))
    _write(tmp_path / "bp", _doc(version="1.1.0"))
    dep2 = _deploy(manager, "ag", manager.blueprint("worker@1.1.0"))
    assert dep2.origin == "catalog"
    assert manager.rollback_target("ag") == manager.blueprint("worker@1.0.0")
    _write(tmp_path / "bp", _doc(budgets={"daily_tokens": 7}))  # 1.0.0 edited in place
    with pytest.raises(ApplianceError, match=r"worker@1\.0\.0 changed since it was deployed"):
        manager.rollback_target("ag")
    # A turn reads the catalog's blueprint as it is now, as before.
    assert manager.deployed(dep2) == manager.blueprint("worker@1.1.0")
