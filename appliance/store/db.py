"""Open the state store: one SQLite file in WAL mode, migrated to the latest schema on open."""

from __future__ import annotations

import fcntl
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from appliance.errors import StateError
from appliance.store.migrations import MIGRATIONS

DB_NAME = "appliance.db"
BUSY_TIMEOUT_S = 10.0  # how long a writer waits for another process's write lock


def connect(path: Path, *, any_thread: bool = False) -> sqlite3.Connection:
    """A connection with the store's settings, the one place they are set: WAL (readers never
    wait for the writer), foreign keys enforced, synchronous=NORMAL (safe with WAL), and a busy
    wait instead of an immediate "database is locked". `any_thread`: the connection may be used
    from threads other than the one that opened it (the caller serialises them)."""
    try:
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, check_same_thread=not any_thread)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA synchronous=NORMAL")
    except sqlite3.Error as exc:
        raise StateError(f"{path}: {exc}") from None
    return conn


class Store:
    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path

    @property
    def schema_version(self) -> int:
        return self.conn.execute("PRAGMA user_version").fetchone()[0]

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record_plan(self, backend: str, model: str, plan: dict[str, Any]) -> int:
        with self.conn:
            cur = self.conn.execute(
                "INSERT INTO plans (created_at, backend, model, plan_json) VALUES (?, ?, ?, ?)",
                (time.time(), backend, model, json.dumps(plan, sort_keys=True)),
            )
        return int(cur.lastrowid or 0)

    def latest_plan(self) -> dict[str, Any] | None:
        row = self.conn.execute(
            "SELECT created_at, plan_json FROM plans ORDER BY id DESC LIMIT 1"
        ).fetchone()
        if row is None:
            return None
        return {"recorded_at": row[0], "plan": json.loads(row[1])}


def migrate(conn: sqlite3.Connection, path: Path) -> None:
    # Two processes opening a fresh state dir at once must not both apply migration 1:
    # serialise on a lock file and read the version under it.
    with open(path.with_name(path.name + ".migrate.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = conn.execute("PRAGMA user_version").fetchone()[0]
        if current > len(MIGRATIONS):
            raise StateError(
                f"{path}: schema version {current} is newer than this appliance knows "
                f"({len(MIGRATIONS)})",
                hint="upgrade the appliance, or point APPLIANCE_STATE_DIR at another directory",
            )
        for version, (_name, sql) in enumerate(MIGRATIONS[current:], start=current + 1):
            # executescript commits first; wrap each migration so it applies whole or not at all.
            conn.executescript(
                f"BEGIN IMMEDIATE;\n{sql}\nPRAGMA user_version = {version};\nCOMMIT;"
            )


def open_store(state_dir: Path) -> Store:
    path = state_dir / DB_NAME
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        conn = connect(path)
        conn.isolation_level = None  # migrate() runs its own BEGIN IMMEDIATE ... COMMIT
        migrate(conn, path)
    except sqlite3.Error as exc:
        raise StateError(f"{path}: {exc}") from None
    except OSError as exc:
        raise StateError(f"{state_dir}: {exc.strerror}") from None
    conn.isolation_level = ""  # back to implicit transactions, `with conn:` commits
    return Store(conn, path)
