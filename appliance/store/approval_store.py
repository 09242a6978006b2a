"""Approval decisions the control plane took, kept across its restarts (approval_decisions).

A proxy forgets a request once it is decided, and the control plane's memory dies with its
process: this table is what still knows, after a restart, that an id was decided (and how, by
whom), so a second decision is a conflict naming the first rather than "unknown". Only the
newest KEPT are kept: an id is a proxy's short random hex, decided once, asked about again within
minutes if at all.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from appliance.store.db import DB_NAME, connect, open_store

KEPT = 4096  # decisions remembered (the oldest forgotten first)
_COLUMNS = "id, sandbox, host, port, decision, actor, decided_at"


class ApprovalDecisions:
    """One connection shared by the API's worker threads, serialised by a lock: each call is one
    small statement on a small table."""

    def __init__(self, state_dir: Path, kept: int = KEPT) -> None:
        open_store(state_dir).close()  # creates and migrates the database once
        self.kept = kept
        self._lock = threading.Lock()
        self._conn = connect(state_dir / DB_NAME, any_thread=True)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def get(self, approval_id: str) -> dict[str, Any] | None:
        """How `approval_id` was decided ({id, sandbox, host, port, decision, actor,
        decided_at}), or None when it never was (or was forgotten)."""
        with self._lock:
            row = self._conn.execute(
                f"SELECT {_COLUMNS} FROM approval_decisions WHERE id = ?", (approval_id,)
            ).fetchone()
        return None if row is None else dict(zip(_COLUMNS.split(", "), row, strict=True))

    def recent(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest `limit` decisions, newest first."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM approval_decisions "
                "ORDER BY decided_at DESC, rowid DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [dict(zip(_COLUMNS.split(", "), row, strict=True)) for row in rows]

    def record(self, decided: dict[str, Any], actor: str) -> None:
        """Remember a decision (the API's answer: id, sandbox, host, port, decision) and who
        took it; the oldest beyond `kept` are forgotten in the same transaction."""
        row = [decided[k] for k in ("id", "sandbox", "host", "port", "decision")]
        with self._lock, self._conn:
            # REPLACE: an id forgotten by the proxy may be drawn again; the newest decision wins.
            self._conn.execute(
                f"INSERT OR REPLACE INTO approval_decisions ({_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (*row, actor, time.time()),
            )
            self._conn.execute(
                "DELETE FROM approval_decisions "
                "WHERE rowid <= (SELECT max(rowid) FROM approval_decisions) - ?",
                (self.kept,),
            )
