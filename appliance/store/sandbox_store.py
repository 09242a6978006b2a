"""Sandbox records and policy revisions in the state store."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass

from appliance.store.db import Store
from sandbox.policy import Network, Policy, parse_policy


@dataclass(frozen=True)
class SandboxRecord:
    name: str
    container_id: str | None
    image: str
    command: list[str]
    key_id: str | None
    state: str
    created_at: float
    updated_at: float


_COLUMNS = "name, container_id, image, command_json, key_id, state, created_at, updated_at"


def _record(row: tuple) -> SandboxRecord:
    return SandboxRecord(row[0], row[1], row[2], json.loads(row[3]), row[4], row[5], row[6], row[7])


class SandboxStore:
    def __init__(self, store: Store) -> None:
        self.conn = store.conn

    # -- sandboxes ---------------------------------------------------------------------------

    def upsert(
        self,
        name: str,
        *,
        image: str,
        command: list[str],
        state: str,
        container_id: str | None = None,
        key_id: str | None = None,
    ) -> None:
        now = time.time()
        with self.conn:
            self.conn.execute(
                f"INSERT INTO sandboxes ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET container_id = excluded.container_id, "
                "image = excluded.image, command_json = excluded.command_json, "
                "key_id = excluded.key_id, state = excluded.state, "
                "updated_at = excluded.updated_at",
                (name, container_id, image, json.dumps(command), key_id, state, now, now),
            )

    def claim(self, name: str, *, image: str, command: list[str]) -> bool:
        """Insert the record in state `creating`; False if the name is taken (two creates of
        one name race here, in one transaction, and only one wins)."""
        now = time.time()
        try:
            with self.conn:
                self.conn.execute(
                    f"INSERT INTO sandboxes ({_COLUMNS}) VALUES (?, NULL, ?, ?, NULL, ?, ?, ?)",
                    (name, image, json.dumps(command), "creating", now, now),
                )
        except sqlite3.IntegrityError:
            return False
        return True

    def set_state(self, name: str, state: str, container_id: str | None = None) -> None:
        with self.conn:
            self.conn.execute(
                "UPDATE sandboxes SET state = ?, container_id = COALESCE(?, container_id), "
                "updated_at = ? WHERE name = ?",
                (state, container_id, time.time(), name),
            )

    def get(self, name: str) -> SandboxRecord | None:
        row = self.conn.execute(
            f"SELECT {_COLUMNS} FROM sandboxes WHERE name = ?", (name,)
        ).fetchone()
        return _record(row) if row else None

    def list(self) -> list[SandboxRecord]:
        rows = self.conn.execute(f"SELECT {_COLUMNS} FROM sandboxes ORDER BY name").fetchall()
        return [_record(r) for r in rows]

    def delete(self, name: str) -> None:
        with self.conn:
            self.conn.execute("DELETE FROM sandboxes WHERE name = ?", (name,))

    # -- policy revisions --------------------------------------------------------------------

    def add_revision(self, sandbox: str, policy: Policy, reason: str) -> int:
        with self.conn:
            row = self.conn.execute(
                "SELECT COALESCE(MAX(rev), 0) FROM policy_revisions WHERE sandbox = ?", (sandbox,)
            ).fetchone()
            rev = row[0] + 1
            self.conn.execute(
                "INSERT INTO policy_revisions (sandbox, rev, policy_yaml, reason, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (sandbox, rev, policy.to_yaml(), reason, time.time()),
            )
        return rev

    def delete_revision(self, sandbox: str, rev: int) -> None:
        """Undo `add_revision` for a create that failed."""
        with self.conn:
            self.conn.execute(
                "DELETE FROM policy_revisions WHERE sandbox = ? AND rev = ?", (sandbox, rev)
            )

    def latest_policy(self, sandbox: str) -> tuple[int, Policy] | None:
        row = self.conn.execute(
            "SELECT rev, policy_yaml FROM policy_revisions WHERE sandbox = ? "
            "ORDER BY rev DESC LIMIT 1",
            (sandbox,),
        ).fetchone()
        if row is None:
            return None
        return row[0], parse_policy(row[1], f"{sandbox} policy revision {row[0]}")

    def revisions(self, sandbox: str) -> list[dict]:
        rows = self.conn.execute(
            "SELECT rev, reason, created_at FROM policy_revisions WHERE sandbox = ? ORDER BY rev",
            (sandbox,),
        ).fetchall()
        return [{"rev": r[0], "reason": r[1], "created_at": r[2]} for r in rows]

    def set_network(self, sandbox: str, network: Network, reason: str) -> int:
        """A new revision with only the dynamic part changed."""
        latest = self.latest_policy(sandbox)
        if latest is None:
            raise KeyError(sandbox)
        return self.add_revision(sandbox, latest[1].with_network(network), reason)

    # -- kill switch hold ----------------------------------------------------------------------

    def hold(self, reason: str) -> None:
        with self.conn:
            self.conn.execute(
                "INSERT INTO kill_hold (id, held, reason, since) VALUES (1, 1, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET held = 1, reason = excluded.reason, "
                "since = excluded.since",
                (reason, time.time()),
            )

    def release(self) -> None:
        with self.conn:
            self.conn.execute("UPDATE kill_hold SET held = 0 WHERE id = 1")

    def held(self) -> str | None:
        """The hold's reason while starting sandboxes is refused, else None."""
        row = self.conn.execute("SELECT held, reason FROM kill_hold WHERE id = 1").fetchone()
        return (row[1] or "held") if row and row[0] else None
