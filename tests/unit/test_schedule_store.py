"""Schedule state in the store (migration 10, appliance/store/schedule_store.py): a store at
migration 9 with data upgrades in place; rows are per agent and entry key; a skip is kept beside
the last run and never hides its outcome; rows no deployment has any more are deleted."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from appliance.store import open_store
from appliance.store.migrations import MIGRATIONS
from appliance.store.schedule_store import ScheduleStore, read_states

SCHEDULE_MIGRATION = 10


def test_migration_10_upgrades_a_store_at_9_and_keeps_its_data(tmp_path: Path) -> None:
    assert MIGRATIONS[SCHEDULE_MIGRATION - 1][0].startswith("scheduler:")
    conn = sqlite3.connect(tmp_path / "appliance.db")
    before = "\n".join(sql for _, sql in MIGRATIONS[: SCHEDULE_MIGRATION - 1])
    conn.executescript(f"{before}\nPRAGMA user_version = {SCHEDULE_MIGRATION - 1};")
    conn.execute(
        "INSERT INTO plans (created_at, backend, model, plan_json) "
        "VALUES (1, 'embedded', 'm', '{}')"
    )
    conn.commit()
    conn.close()
    with open_store(tmp_path) as store:
        assert store.schema_version == len(MIGRATIONS)
        assert store.latest_plan() is not None
        assert read_states(store.conn) == []
    schedules = ScheduleStore(tmp_path)
    schedules.planned("a1", "k1", 0, 100.0)
    [row] = schedules.states()
    assert (row.agent, row.entry_key, row.next_run_at, row.runs) == ("a1", "k1", 100.0, 0)


@pytest.mark.parametrize("outcome", ["maybe", "skipped"])  # a skip is no run's outcome
def test_outcomes_are_checked_by_the_schema(tmp_path: Path, outcome: str) -> None:
    with open_store(tmp_path) as store, pytest.raises(sqlite3.IntegrityError):
        store.conn.execute(
            "INSERT INTO schedule_state (agent, entry_key, entry_index, last_outcome, "
            "updated_at) VALUES ('a', 'k', 0, ?, 0)",
            (outcome,),
        )


def test_runs_skips_and_a_late_end(tmp_path: Path) -> None:
    schedules = ScheduleStore(tmp_path)
    schedules.planned("a1", "k1", 0, 60.0)
    schedules.started("a1", "k1", 60.0)
    schedules.skipped("a1", "k1", 120.0, "the previous run is still running")
    [row] = schedules.states("a1")
    assert (row.last_run_at, row.last_outcome) == (60.0, "running")  # a skip hides no run
    assert (row.last_skip_at, row.last_skip_reason) == (120.0, "the previous run is still running")
    schedules.finished("a1", "k1", 60.0, "ok", None)  # the first run ends after the skip
    [row] = schedules.states("a1")
    assert (row.last_run_at, row.last_outcome, row.last_reason) == (60.0, "ok", None)
    assert (row.last_skip_at, row.last_skip_reason) == (120.0, "the previous run is still running")
    assert (row.runs, row.skips) == (1, 1)
    schedules.started("a1", "k1", 180.0)
    schedules.finished("a1", "k1", 180.0, "failed", "exit code 3")
    schedules.finished("a1", "k1", 60.0, "cancelled", None)  # not the last run any more
    [row] = schedules.states("a1")
    assert (row.last_outcome, row.last_reason, row.runs) == ("failed", "exit code 3", 2)
    assert row.last_skip_at == 120.0


def test_retain_and_interrupted(tmp_path: Path) -> None:
    schedules = ScheduleStore(tmp_path)
    for agent, key in (("a1", "k1"), ("a1", "k2"), ("a2", "k1")):
        schedules.planned(agent, key, 0, 60.0)
    schedules.started("a1", "k1", 60.0)
    schedules.retain({"a1": {"k1"}})  # a1's k2 changed, a2 removed
    assert [(r.agent, r.entry_key) for r in schedules.states()] == [("a1", "k1")]
    schedules.interrupted("the control plane stopped during the run")
    [row] = schedules.states()
    assert row.last_outcome == "interrupted"
    schedules.close()
