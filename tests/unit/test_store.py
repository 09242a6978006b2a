"""The SQLite state store: WAL mode, migrations applied once, newer schemas refused."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from appliance.errors import StateError
from appliance.store import open_store
from appliance.store.migrations import MIGRATIONS


def test_open_creates_wal_store_at_latest_schema(tmp_path: Path) -> None:
    with open_store(tmp_path / "s") as store:
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.schema_version == len(MIGRATIONS)
    assert (tmp_path / "s").stat().st_mode & 0o777 == 0o700


def test_reopen_keeps_data_and_does_not_reapply(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        store.record_plan("embedded", "m", {"variant": "x"})
    with open_store(tmp_path) as store:
        latest = store.latest_plan()
        assert latest is not None and latest["plan"] == {"variant": "x"}
        assert store.schema_version == len(MIGRATIONS)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "appliance.db")
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(StateError, match="newer than this appliance knows"):
        open_store(tmp_path)


def test_unwritable_state_dir_is_a_state_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StateError):
        open_store(blocker / "state")
