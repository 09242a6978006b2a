"""The inference package's Protocols (KeyStore, Ledger, BudgetStore, AuditSink) on the SQLite store.

One connection per thread (the gateway's event loop reads, its ledger writer thread writes; WAL
lets them run side by side). Secrets are `sk-app-` + 32 random bytes, urlsafe; only their SHA-256
is stored, so the store can authenticate a key but never give one back.

Audit events go to two places: the audit_events table (queried by event, for budgets, tests and
status) and the host's hash-chained audit log (appliance/audit.py, the tamper-evident record).
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
from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.audit import ChainWriter, audit_path
from appliance.errors import ApplianceError, StateError
from appliance.names import KeyNameError, check_key_name
from appliance.store.db import DB_NAME, open_store
from inference.ports import Budget, KeyRecord, OwnerKind, Spend, UsageRecord

SECRET_PREFIX = "sk-app-"
_MODEL = re.compile(r"^[!-~]{1,256}$")  # printable ASCII, no spaces: what a request can name
_KEY_COLUMNS = "id, name, owner_kind, created_at, revoked_at, allowed_models_json"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def _month_bounds(ts: float) -> tuple[str, str]:
    t = datetime.fromtimestamp(ts, UTC)
    nxt = (t.year + 1, 1) if t.month == 12 else (t.year, t.month + 1)
    return f"{t.year:04d}-{t.month:02d}-01", f"{nxt[0]:04d}-{nxt[1]:02d}-01"


def _key(row: tuple[Any, ...]) -> KeyRecord:
    models = None if row[5] is None else tuple(json.loads(row[5]))
    return KeyRecord(
        id=row[0],
        name=row[1],
        owner_kind=row[2],
        created_at=row[3],
        revoked_at=row[4],
        allowed_models=models,
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


class InferenceStore:
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
            try:
                conn = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA foreign_keys=ON")
                conn.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.Error as exc:
                raise StateError(f"{self.path}: {exc}") from None
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
    ) -> tuple[KeyRecord, str]:
        """`allowed_models`: the model names the key may request; None (the default) allows any.
        Set once, with the key: it never changes, so the auth cache can hold it."""
        check_key_name(name, owner_kind)  # the one name rule (appliance/names.py)
        models = _model_list(allowed_models)
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        record = KeyRecord(
            id="key_" + secrets.token_hex(8),
            name=name,
            owner_kind=owner_kind,
            created_at=time.time(),
            allowed_models=models,
        )
        stored = None if models is None else json.dumps(list(models))
        try:
            with self.conn:
                self.conn.execute(
                    "INSERT INTO api_keys (id, name, owner_kind, secret_sha256, created_at, "
                    "allowed_models_json) VALUES (?, ?, ?, ?, ?, ?)",
                    (record.id, name, owner_kind, hash_secret(secret), record.created_at, stored),
                )
                self._audit(
                    "key.created",
                    record.id,
                    {
                        "name": name,
                        "owner_kind": owner_kind,
                        "allowed_models": None if models is None else list(models),
                    },
                )
        except sqlite3.IntegrityError:
            raise KeyNameError(f"a live key named {name!r} already exists") from None
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

    def revoke_key(self, key_id_or_name: str) -> KeyRecord | None:
        key = self.find_key(key_id_or_name)
        if key is None or key.revoked_at is not None:
            return None
        now = time.time()
        with self.conn:
            self.conn.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (now, key.id),
            )
            self._audit("key.revoked", key.id, {"name": key.name})
        self._auth_cache.clear()
        return replace(key, revoked_at=now)

    # -- Ledger ------------------------------------------------------------------------------

    def record_usage(self, usage: UsageRecord) -> None:
        self.record_usages([usage])

    def record_usages(self, usages: Sequence[UsageRecord]) -> None:
        if not usages:
            return
        rows = []
        daily: dict[tuple[str, str], list[float]] = {}
        for u in usages:
            ts = u.ts or time.time()
            rows.append(
                (
                    ts,
                    u.key_id,
                    u.model,
                    u.prompt_tokens,
                    u.completion_tokens,
                    u.latency_s,
                    u.status,
                    int(u.stream),
                    u.cost,
                )
            )
            agg = daily.setdefault((u.key_id, _day(ts)), [0, 0, 0.0, 0])
            agg[0] += u.prompt_tokens
            agg[1] += u.completion_tokens
            agg[2] += u.cost
            agg[3] += 1
        with self.conn:
            self.conn.executemany(
                "INSERT INTO usage_ledger (ts, key_id, model, prompt_tokens, completion_tokens, "
                "latency_s, status, stream, cost) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            self.conn.executemany(
                "INSERT INTO usage_daily (key_id, day, prompt_tokens, completion_tokens, cost, "
                "requests) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key_id, day) DO UPDATE SET "
                "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
                "completion_tokens = completion_tokens + excluded.completion_tokens, "
                "cost = cost + excluded.cost, requests = requests + excluded.requests",
                [(k, d, *agg) for (k, d), agg in daily.items()],
            )

    def spend(self, key_id: str, now: float | None = None) -> Spend:
        now = time.time() if now is None else now
        first, next_first = _month_bounds(now)
        today = _day(now)
        row = self.conn.execute(
            "SELECT "
            "COALESCE(SUM(CASE WHEN day = ? THEN prompt_tokens + completion_tokens END), 0), "
            "COALESCE(SUM(prompt_tokens + completion_tokens), 0), "
            "COALESCE(SUM(CASE WHEN day = ? THEN cost END), 0.0), "
            "COALESCE(SUM(cost), 0.0) "
            "FROM usage_daily WHERE key_id = ? AND day >= ? AND day < ?",
            (today, today, key_id, first, next_first),
        ).fetchone()
        return Spend(day_tokens=row[0], month_tokens=row[1], day_cost=row[2], month_cost=row[3])

    def usage_totals(self, key_id: str | None = None) -> dict[str, float]:
        """All-time sums from the ledger rows themselves (not the daily roll-up)."""
        where, args = ("WHERE key_id = ?", (key_id,)) if key_id else ("", ())
        row = self.conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(prompt_tokens), 0), "
            "COALESCE(SUM(completion_tokens), 0), COALESCE(SUM(cost), 0.0) "
            f"FROM usage_ledger {where}",
            args,
        ).fetchone()
        return {
            "requests": row[0],
            "prompt_tokens": row[1],
            "completion_tokens": row[2],
            "cost": row[3],
        }

    def usage_rows(self, key_id: str | None = None) -> list[UsageRecord]:
        where, args = ("WHERE key_id = ?", (key_id,)) if key_id else ("", ())
        rows = self.conn.execute(
            "SELECT key_id, model, prompt_tokens, completion_tokens, latency_s, status, stream, "
            f"cost, ts FROM usage_ledger {where} ORDER BY id",
            args,
        ).fetchall()
        return [
            UsageRecord(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), r[7], r[8]) for r in rows
        ]

    # -- BudgetStore -------------------------------------------------------------------------

    def get_budget(self, key_id: str) -> Budget | None:
        row = self.conn.execute(
            "SELECT daily_tokens, monthly_tokens, daily_cost, monthly_cost FROM budgets "
            "WHERE key_id = ?",
            (key_id,),
        ).fetchone()
        return Budget(key_id, *row) if row else None

    def set_budget(self, budget: Budget) -> None:
        """A budget with no limit at all removes the key's budget."""
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
                dict(
                    zip(
                        ("daily_tokens", "monthly_tokens", "daily_cost", "monthly_cost"),
                        limits,
                        strict=True,
                    )
                ),
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
