"""An agent's runtime state (the supervisor's report) in the inventory: GET /agents and `agent
list` (a `runtime` column) show its state, restarts and last exit's reason; a report's unknown
state reads `unknown` (the sandbox side writes it: none of its text reaches a terminal); a
stopped sandbox shows none (its report may be stale). No Podman: tests/turn_fixtures.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.store import open_store
from appliance.store.sandbox_store import SandboxStore
from tests.turn_fixtures import AGENT, World, turn_world


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    with turn_world(tmp_path, monkeypatch) as made:
        yield made


def _row(world: World) -> dict:
    [row] = [r for r in world.api.get("/agents").json() if r["name"] == AGENT]
    return row


def test_the_inventory_shows_the_runtimes_state_restarts_and_last_exit(world: World) -> None:
    assert _row(world)["runtime"] == {"state": "running", "restarts": 0, "last_exit_reason": None}
    world.runtime.update(
        state="backoff", restarts=2, last_exit={"code": None, "reason": "killed by signal 9"}
    )
    assert _row(world)["runtime"] == {
        "state": "backoff",
        "restarts": 2,
        "last_exit_reason": "killed by signal 9",
    }
    listed = world.cli("agent", "list")
    assert listed.returncode == 0, listed.stderr
    assert "runtime" in listed.stdout and "backoff (2 restarts)" in listed.stdout


def test_a_reports_unknown_state_and_odd_fields_read_as_unknown(world: World) -> None:
    world.runtime.update(state="[bold red]pwned\x1b[2J", restarts="many", last_exit=["x"])
    assert _row(world)["runtime"] == {"state": "unknown", "restarts": 0, "last_exit_reason": None}
    listed = world.cli("agent", "list")
    assert "unknown" in listed.stdout and "pwned" not in listed.stdout


def test_a_stopped_sandbox_shows_no_runtime(world: World) -> None:
    world.runtime.update(state="fail_closed")
    assert _row(world)["runtime"]["state"] == "fail_closed"
    with open_store(world.state) as store:
        SandboxStore(store).set_state(AGENT, "stopped")
    assert _row(world)["runtime"] is None
    assert " - " in world.cli("agent", "list").stdout
