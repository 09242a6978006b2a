"""GET /api/v1/agents/{name}/schedule (a viewer may read it): each entry of the agent's deployed
blueprint with its next and last run and its last skip from the store; an unknown or hostile name
is answered in the API's one error shape. The deployed blueprints' cache tries an unresolvable
blueprint again after a while (its catalog file may come back)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from appliance.config import ApplianceConfig, BlueprintsConfig
from appliance.control.api import create_app
from appliance.control.plane import ControlPlane
from appliance.control.scheduler import Entry
from appliance.control.schedules import RETRY_S, DeployedBlueprints
from appliance.store import open_store
from appliance.store.agent_store import AgentStore
from appliance.store.schedule_store import ScheduleStore
from blueprints.model import Blueprint

SCHEDULE = [
    {"every": "1m", "prompt": "tick"},
    {"cron": "0 9 * * 1-5", "tz": "Europe/Paris", "prompt": "morning", "session": "daily",
     "active_hours": {"start": "08:00", "end": "18:00"}},
]  # fmt: skip


def _blueprint() -> Blueprint:
    return Blueprint.model_validate(
        {
            "name": "filed",
            "version": "1.0.0",
            "runtime": {"kind": "command", "command": ["sleep", "infinity"]},
            "image": {"name": "localhost/appliance-base", "digest": "sha256:" + "0" * 64},
            "sandbox": {"base": "default"},
            "schedule": SCHEDULE,
        }
    )


@pytest.fixture
def api(tmp_path: Path) -> TestClient:
    config = ApplianceConfig(state_dir=tmp_path / "s")
    plane = ControlPlane(config)
    bp = _blueprint()
    with open_store(config.state_dir) as store:
        AgentStore(store).deploy(
            "a1", bp.name, bp.version, bp.digest(), "img", "create",
            origin="client", blueprint_json=bp.canonical(),
        )  # fmt: skip
        # From a catalog blueprint the catalog no longer has.
        AgentStore(store).deploy("gone", "ghost", "1.0.0", "sha256:" + "1" * 64, "img", "create")
    _, token = plane.operators.create("watcher", "viewer", {"actor": "test"})
    client = TestClient(create_app(plane), base_url="http://127.0.0.1/api/v1")
    client.headers["authorization"] = f"Bearer {token}"
    return client


def test_a_viewer_reads_the_schedule_with_its_runs(api: TestClient, tmp_path: Path) -> None:
    first = api.get("/agents/a1/schedule")
    assert first.status_code == 200, first.text
    rows = first.json()
    assert [(r["index"], r["every"], r["cron"], r["session"]) for r in rows] == [
        (0, "1m", None, "schedule-0"),
        (1, None, "0 9 * * 1-5", "daily"),
    ]
    assert rows[1]["tz"] == "Europe/Paris"
    assert rows[1]["active_hours"] == {"start": "08:00", "end": "18:00"}
    assert all(r["next_run_at"] is None and r["runs"] == 0 for r in rows)  # not planned yet
    key = Entry("a1", 0, _blueprint().schedule[0]).key
    store = ScheduleStore(tmp_path / "s")
    store.planned("a1", key, 0, 1000.0)
    store.started("a1", key, 880.0)
    store.skipped("a1", key, 940.0, "the previous run (started 10:01:00Z) is still running")
    store.finished("a1", key, 880.0, "failed", "exit code 3")
    [row, _] = api.get("/agents/a1/schedule").json()
    assert (row["next_run_at"], row["runs"], row["skips"]) == (1000.0, 1, 1)
    assert (row["last_run_at"], row["last_outcome"], row["last_reason"]) == (
        880.0,
        "failed",
        "exit code 3",
    )
    assert (row["last_skip_at"], row["last_skip_reason"]) == (
        940.0,
        "the previous run (started 10:01:00Z) is still running",
    )


@pytest.mark.parametrize(
    ("name", "status"), [("nobody", 404), ("Bad..Name", 422), ("x" * 300, 422)]
)
def test_unknown_or_hostile_names(api: TestClient, name: str, status: int) -> None:
    answer = api.get(f"/agents/{name}/schedule")
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["message"] and error["type"] in ("not_found", "config_error")


def test_no_token_no_schedule(api: TestClient) -> None:
    del api.headers["authorization"]
    assert api.get("/agents/a1/schedule").status_code == 401


def test_an_agent_whose_blueprint_cannot_be_resolved(api: TestClient) -> None:
    answer = api.get("/agents/gone/schedule")
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["message"] == (
        "agent gone's blueprint cannot be resolved, so neither can its schedule"
    )


def test_an_unresolvable_blueprint_is_tried_again_later(tmp_path: Path) -> None:
    catalog = tmp_path / "bp"
    config = ApplianceConfig(state_dir=tmp_path / "s", blueprints=BlueprintsConfig(dirs=[catalog]))
    bp = _blueprint()
    ControlPlane(config)  # the store, migrated
    with open_store(config.state_dir) as store:  # from a catalog file that is not there (yet)
        AgentStore(store).deploy("a1", bp.name, bp.version, bp.digest(), "img", "create")
    now = [1000.0]
    deployed = DeployedBlueprints(config, clock=lambda: now[0])
    assert deployed.current() == {"a1": None}
    path = catalog / bp.name / bp.version / "blueprint.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(bp.model_dump(mode="json")))  # the file is back
    now[0] += RETRY_S - 1
    assert deployed.current() == {"a1": None}  # not before its retry time
    now[0] += 1
    [found] = deployed.current().values()
    assert found is not None and found.digest() == bp.digest()
    assert [e.spec.prompt for e in deployed.entries()] == ["tick", "morning"]
    path.unlink()  # resolved: cached for the deployment's life, no catalog read per tick
    now[0] += 10 * RETRY_S
    assert deployed.current()["a1"] is not None
