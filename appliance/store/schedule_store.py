"""Schedule state in the store (schedule_state, migration 10): per agent and schedule entry, when
it runs next, when its last run started and how it went, and when it was last skipped and why
(kept apart: a skip while a run goes on must not hide that run's outcome).

An entry's row is keyed by `entry_key`, a hash of the entry as deployed and its index: an upgrade
that changes an entry starts a fresh row instead of inheriting the old one's times, and `retain`
deletes the rows no current deployment has. The scheduler's thread and its turn threads share one
connection, serialised by a lock (each call is one small statement).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from appliance.store.db import DB_NAME, connect, open_store

# A run's outcome (a skip is no run: it has its own columns).
Outcome = Literal["running", "ok", "failed", "cancelled", "interrupted"]


@dataclass(frozen=True)
class EntryState:
    agent: str
    entry_key: str
    entry_index: int
    next_run_at: float | None
    last_run_at: float | None  # when the last run started
    last_outcome: Outcome | None  # how it went (`running` until it ends)
    last_reason: str | None  # why it failed or was cancelled
    last_skip_at: float | None  # when a run was last skipped
    last_skip_reason: str | None
    runs: int
    skips: int
    updated_at: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_COLUMNS = (
    "agent, entry_key, entry_index, next_run_at, last_run_at, last_outcome, last_reason, "
    "last_skip_at, last_skip_reason, runs, skips, updated_at"
)


def read_states(conn: sqlite3.Connection, agent: str | None = None) -> list[EntryState]:
    """The rows (of one agent, or all), by agent and entry index; on the caller's connection
    (`appliance status` reads them this way, never writing)."""
    where, args = ("WHERE agent = ?", (agent,)) if agent is not None else ("", ())
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM schedule_state {where} ORDER BY agent, entry_index", args
    ).fetchall()
    return [EntryState(*row) for row in rows]


class ScheduleStore:
    def __init__(self, state_dir: Path) -> None:
        open_store(state_dir).close()  # creates and migrates the database once
        self._lock = threading.Lock()
        self._conn = connect(state_dir / DB_NAME, any_thread=True)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def states(self, agent: str | None = None) -> list[EntryState]:
        with self._lock:
            return read_states(self._conn, agent)

    def retain(self, keys: dict[str, set[str]]) -> None:
        """Delete every row whose agent is not in `keys`, or whose entry key is not in its set."""
        with self._lock, self._conn:
            for agent, entry_key in self._conn.execute(
                "SELECT agent, entry_key FROM schedule_state"
            ).fetchall():
                if entry_key not in keys.get(agent, ()):
                    self._conn.execute(
                        "DELETE FROM schedule_state WHERE agent = ? AND entry_key = ?",
                        (agent, entry_key),
                    )

    def interrupted(self, reason: str) -> None:
        """Runs a previous control plane left `running` (it died mid-turn): no longer running."""
        with self._lock, self._conn:
            self._conn.execute(
                "UPDATE schedule_state SET last_outcome = 'interrupted', last_reason = ?, "
                "updated_at = ? WHERE last_outcome = 'running'",
                (reason, time.time()),
            )

    def planned(self, agent: str, entry_key: str, index: int, next_run_at: float) -> None:
        """The entry's next run (the row made when missing)."""
        with self._lock, self._conn:
            self._conn.execute(
                "INSERT INTO schedule_state (agent, entry_key, entry_index, next_run_at, "
                "updated_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT (agent, entry_key) DO UPDATE "
                "SET entry_index = excluded.entry_index, next_run_at = excluded.next_run_at, "
                "updated_at = excluded.updated_at",
                (agent, entry_key, index, next_run_at, time.time()),
            )

    def started(self, agent: str, entry_key: str, at: float) -> None:
        """A run started at `at` (its outcome `running` until `finished`)."""
        with self._lock, self._conn:
            self._conn.execute(
                "UPDATE schedule_state SET last_run_at = ?, last_outcome = 'running', "
                "last_reason = NULL, runs = runs + 1, updated_at = ? "
                "WHERE agent = ? AND entry_key = ?",
                (at, time.time(), agent, entry_key),
            )

    def skipped(self, agent: str, entry_key: str, at: float, reason: str) -> None:
        """A run not started, and why; the last run's columns are left as they are."""
        with self._lock, self._conn:
            self._conn.execute(
                "UPDATE schedule_state SET last_skip_at = ?, last_skip_reason = ?, "
                "skips = skips + 1, updated_at = ? WHERE agent = ? AND entry_key = ?",
                (at, reason, time.time(), agent, entry_key),
            )

    def finished(
        self, agent: str, entry_key: str, started_at: float, outcome: Outcome, reason: str | None
    ) -> None:
        """The end of the run started at `started_at` (a later run of the entry, which only a
        new process could start meanwhile, is not overwritten)."""
        with self._lock, self._conn:
            self._conn.execute(
                "UPDATE schedule_state SET last_outcome = ?, last_reason = ?, updated_at = ? "
                "WHERE agent = ? AND entry_key = ? AND last_run_at = ?",
                (outcome, reason, time.time(), agent, entry_key, started_at),
            )
