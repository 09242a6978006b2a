"""The inference package's Protocols (KeyStore, Ledger, BudgetStore, AuditSink) on the SQLite store.

One connection per thread (the gateway's event loop reads, its ledger writer thread writes; WAL
lets them run side by side). Secrets are `sk-app-` + 32 random bytes, urlsafe; only their SHA-256
is stored, so the store can authenticate a key but never give one back.

Audit events go to two places: the audit_events table (queried by event, for budgets, tests and
status) and the host's hash-chained audit log (appliance/audit/, the tamper-evident record).
The chain is appended inside the event's transaction, before it commits: an action whose audit
record cannot be written fails instead of happening unrecorded.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from appliance.audit import ChainWriter, audit_path
from appliance.errors import ApplianceError
from appliance.store.db import DB_NAME, connect, open_store
from appliance.store.ledger import LedgerMixin
from appliance.store.names import KeyExistsError, check_key_name, check_scopes
from inference.ports import Budget, KeyRecord, OwnerKind, Scope

SECRET_PREFIX = "sk-app-"
_MODEL = re.compile(r"^[!-~]{1,256}$")  # printable ASCII, no spaces: what a request can name
_KEY_COLUMNS = "id, name, owner_kind, created_at, revoked_at, allowed_models_json, scopes_json"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _key(row: tuple[Any, ...]) -> KeyRecord:
    models = None if row[5] is None else tuple(json.loads(row[5]))
    return KeyRecord(
        id=row[0],
        name=row[1],
        owner_kind=row[2],
        created_at=row[3],
        revoked_at=row[4],
        allowed_models=models,
        scopes=tuple(json.loads(row[6])) if row[6] else (),
    )


def _model_list(models: Iterable[str] | None) -> tuple[str, ...] | None:
    """Sorted and without repeats (a stable record); None stays None: any model."""
    if models is None:
        return None
    if isinstance(models, str):  # a bare string would allow its letters: a caller's bug
        raise TypeError("allowed_models must be a list of names, not a string")
    names = tuple(sorted(set(models)))
    for name in names:
        if not isinstance(name, str) or not _MODEL.match(name):
            raise KeyModelError(f"invalid model name {name!r}")
    return names


class KeyModelError(ApplianceError):
    """A model name in a key's allowlist is malformed."""

    hint = "model names are 1-256 printable characters without spaces; see GET /v1/models"


class InferenceStore(LedgerMixin):
    """KeyStore + Ledger + BudgetStore + AuditSink, backed by <state_dir>/appliance.db."""

    def __init__(self, state_dir: Path, auth_cache_ttl_s: float = 1.0) -> None:
        open_store(state_dir).close()  # creates and migrates the database once
        self.path = state_dir / DB_NAME
        self.chain = ChainWriter(audit_path(state_dir))
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        # sha256 -> (record, expiry): authentication is on every request's path. The short TTL
        # bounds how long a key revoked by another process (the CLI) keeps working. The record
        # carries the key's model allowlist, which never changes for a key: no staleness there.
        self._auth_cache: dict[str, tuple[KeyRecord, float]] = {}
        self._auth_ttl = auth_cache_ttl_s

    # -- connections -----------------------------------------------------------------------

    @property
    def conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path, any_thread=True)  # close() runs on another thread
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def close(self) -> None:
        with self._conns_lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()
        self._local = threading.local()

    def __enter__(self) -> InferenceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- KeyStore ----------------------------------------------------------------------------

    def create_key(
        self,
        name: str,
        owner_kind: OwnerKind = "client",
        allowed_models: Sequence[str] | None = None,
        scopes: Sequence[Scope] = (),
        actor: Mapping[str, Any] | None = None,
    ) -> tuple[KeyRecord, str]:
        """`allowed_models`: the model names the key may request; None (the default) allows any.
        `scopes`: what else it may do (("metrics",): scrape GET /metrics); none by default.
        Both are set once, with the key: they never change, so the auth cache can hold them.
        `actor`: who asked (Principal.audit_fields()), recorded with the change."""
        check_key_name(name, owner_kind)  # the one name rule (sandbox/names.py)
        models = _model_list(allowed_models)
        key_scopes = check_scopes(scopes, owner_kind)
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        record = KeyRecord(
            id="key_" + secrets.token_hex(8),
            name=name,
            owner_kind=owner_kind,
            created_at=time.time(),
            allowed_models=models,
            scopes=key_scopes,
        )
        stored = None if models is None else json.dumps(list(models))
        stored_scopes = json.dumps(list(key_scopes)) if key_scopes else None
        try:
            with self.conn:
                self.conn.execute(
                    "INSERT INTO api_keys (id, name, owner_kind, secret_sha256, created_at, "
                    "allowed_models_json, scopes_json) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        record.id,
                        name,
                        owner_kind,
                        hash_secret(secret),
                        record.created_at,
                        stored,
                        stored_scopes,
                    ),
                )
                self._audit(
                    "key.created",
                    record.id,
                    {
                        "name": name,
                        "owner_kind": owner_kind,
                        "allowed_models": None if models is None else list(models),
                        "scopes": list(key_scopes),
                        **(actor or {}),
                    },
                )
        except sqlite3.IntegrityError:
            raise KeyExistsError(f"a live key named {name!r} already exists") from None
        return record, secret

    def discard_key(self, key_id: str) -> None:
        """Undo `create_key` for a create that failed: the key (and its budget) is deleted if
        it never served a request, else revoked (the ledger keeps what it spent)."""
        with self.conn:
            used = self.conn.execute(
                "SELECT 1 FROM usage_ledger WHERE key_id = ? LIMIT 1", (key_id,)
            ).fetchone()
            if used:
                self.conn.execute(
                    "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                    (time.time(), key_id),
                )
            else:
                for table in ("budget_marks", "budgets", "api_keys"):
                    column = "id" if table == "api_keys" else "key_id"
                    self.conn.execute(f"DELETE FROM {table} WHERE {column} = ?", (key_id,))
            self._audit("key.discarded", key_id, {"deleted": not used})
        self._auth_cache.clear()

    def authenticate(self, secret: str) -> KeyRecord | None:
        if not secret.startswith(SECRET_PREFIX):
            return None  # not one of ours: skip the hash and the query
        digest = hash_secret(secret)
        now = time.monotonic()
        hit = self._auth_cache.get(digest)
        if hit is not None and hit[1] > now:
            return hit[0]
        row = self.conn.execute(
            f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE secret_sha256 = ? AND revoked_at IS NULL",
            (digest,),
        ).fetchone()
        if row is None:
            self._auth_cache.pop(digest, None)
            return None
        record = _key(row)
        if len(self._auth_cache) > 10_000:
            self._auth_cache.clear()
        self._auth_cache[digest] = (record, now + self._auth_ttl)
        return record

    def list_keys(self, include_revoked: bool = True) -> list[KeyRecord]:
        where = "" if include_revoked else " WHERE revoked_at IS NULL"
        rows = self.conn.execute(
            f"SELECT {_KEY_COLUMNS} FROM api_keys{where} ORDER BY created_at, id"
        ).fetchall()
        return [_key(r) for r in rows]

    def find_key(self, key_id_or_name: str) -> KeyRecord | None:
        """The key with this id, or the live key with this name."""
        row = self.conn.execute(
            f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE id = ? "
            "OR (name = ? AND revoked_at IS NULL) ORDER BY revoked_at IS NULL DESC LIMIT 1",
            (key_id_or_name, key_id_or_name),
        ).fetchone()
        return _key(row) if row else None

    def revoke_key(
        self, key_id_or_name: str, actor: Mapping[str, Any] | None = None
    ) -> KeyRecord | None:
        key = self.find_key(key_id_or_name)
        if key is None or key.revoked_at is not None:
            return None
        now = time.time()
        with self.conn:
            self.conn.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (now, key.id),
            )
            self._audit("key.revoked", key.id, {"name": key.name, **(actor or {})})
        self._auth_cache.clear()
        return replace(key, revoked_at=now)

    # -- BudgetStore -------------------------------------------------------------------------

    def get_budget(self, key_id: str) -> Budget | None:
        row = self.conn.execute(
            "SELECT daily_tokens, monthly_tokens, daily_cost, monthly_cost FROM budgets "
            "WHERE key_id = ?",
            (key_id,),
        ).fetchone()
        return Budget(key_id, *row) if row else None

    def set_budget(self, budget: Budget, actor: Mapping[str, Any] | None = None) -> None:
        """A budget with no limit at all removes the key's budget. `actor`: who asked."""
        limits = (
            budget.daily_tokens,
            budget.monthly_tokens,
            budget.daily_cost,
            budget.monthly_cost,
        )
        with self.conn:
            if all(v is None for v in limits):
                self.conn.execute("DELETE FROM budgets WHERE key_id = ?", (budget.key_id,))
            else:
                self.conn.execute(
                    "INSERT INTO budgets (key_id, daily_tokens, monthly_tokens, daily_cost, "
                    "monthly_cost, updated_at) VALUES (?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (key_id) DO UPDATE SET daily_tokens = excluded.daily_tokens, "
                    "monthly_tokens = excluded.monthly_tokens, daily_cost = excluded.daily_cost, "
                    "monthly_cost = excluded.monthly_cost, updated_at = excluded.updated_at",
                    (budget.key_id, *limits, time.time()),
                )
            self._audit(
                "budget.set",
                budget.key_id,
                {
                    **dict(
                        zip(
                            ("daily_tokens", "monthly_tokens", "daily_cost", "monthly_cost"),
                            limits,
                            strict=True,
                        )
                    ),
                    **(actor or {}),
                },
            )

    def mark_budget_event(self, key_id: str, budget: str, level: str, period: str) -> bool:
        with self.conn:
            cur = self.conn.execute(
                "INSERT OR IGNORE INTO budget_marks (key_id, budget, level, period, ts) "
                "VALUES (?, ?, ?, ?, ?)",
                (key_id, budget, level, period, time.time()),
            )
        return cur.rowcount == 1

    # -- AuditSink ---------------------------------------------------------------------------

    def audit(self, event: str, **fields: Any) -> None:
        with self.conn:
            self._audit(event, fields.get("key_id"), fields)

    def _audit(self, event: str, key_id: str | None, fields: dict[str, Any]) -> None:
        self.conn.execute(
            "INSERT INTO audit_events (ts, event, key_id, data_json) VALUES (?, ?, ?, ?)",
            (time.time(), event, key_id, json.dumps(fields, sort_keys=True, default=str)),
        )
        chained = fields if key_id is None or "key_id" in fields else {"key_id": key_id, **fields}
        self.chain.append_many([(event, chained)])

    def audit_events(self, event_prefix: str = "", limit: int = 1000) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT ts, event, key_id, data_json FROM audit_events WHERE event LIKE ? "
            "ORDER BY id DESC LIMIT ?",
            (event_prefix + "%", limit),
        ).fetchall()
        return [
            {"ts": r[0], "event": r[1], "key_id": r[2], **json.loads(r[3])} for r in reversed(rows)
        ]
