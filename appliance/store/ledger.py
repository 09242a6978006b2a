"""The usage ledger on SQLite: rows written at admission (`open`, holding a reservation), settled
at the end, and the spend that budgets read (settled usage in usage_daily, open reservations from
the open rows).

Admission is one `BEGIN IMMEDIATE` transaction: read the key's settled spend and its open
reservations, decide, insert the open row. SQLite lets one writer at a time into that section,
so admissions are atomic across threads and across gateway processes sharing the database; a
process lock in front keeps this process's threads from spinning on SQLite's busy handler.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from inference.ports import Reservation, Settlement, Spend, UsageRecord

_ENTRY_COLUMNS = (
    "id, request_id, ts, key_id, model, state, status, stream, prompt_tokens, "
    "completion_tokens, cost, latency_s, reserved_prompt, reserved_completion, reserved_cost, "
    "owner"
)


def day_of(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def month_bounds(ts: float) -> tuple[str, str]:
    t = datetime.fromtimestamp(ts, UTC)
    nxt = (t.year + 1, 1) if t.month == 12 else (t.year, t.month + 1)
    return f"{t.year:04d}-{t.month:02d}-01", f"{nxt[0]:04d}-{nxt[1]:02d}-01"


def _window_starts(ts: float) -> tuple[float, float, float]:
    """Unix times of the start of the UTC day and month of `ts`, and of the next month."""
    t = datetime.fromtimestamp(ts, UTC)
    day = t.replace(hour=0, minute=0, second=0, microsecond=0)
    month = day.replace(day=1)
    nxt = (
        month.replace(year=t.year + 1, month=1)
        if t.month == 12
        else month.replace(month=t.month + 1)
    )
    return day.timestamp(), month.timestamp(), nxt.timestamp()


_DAILY_UPSERT = (
    "INSERT INTO usage_daily (key_id, day, prompt_tokens, completion_tokens, cost, requests) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key_id, day) DO UPDATE SET "
    "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
    "completion_tokens = completion_tokens + excluded.completion_tokens, "
    "cost = cost + excluded.cost, requests = requests + excluded.requests"
)


class _Daily:
    """Per (key, day) sums of a batch, written to usage_daily in the batch's transaction."""

    def __init__(self) -> None:
        self.sums: dict[tuple[str, str], list[float]] = {}

    def add(self, key_id: str, ts: float, prompt: int, completion: int, cost: float) -> None:
        agg = self.sums.setdefault((key_id, day_of(ts)), [0, 0, 0.0, 0])
        agg[0] += prompt
        agg[1] += completion
        agg[2] += cost
        agg[3] += 1

    def write(self, conn: sqlite3.Connection) -> None:
        conn.executemany(_DAILY_UPSERT, [(k, d, *agg) for (k, d), agg in self.sums.items()])


class LedgerMixin:
    """The Ledger protocol (inference/ports.py); the class using it provides `conn`."""

    conn: sqlite3.Connection
    _admit_lock = threading.Lock()

    def record_usage(self, usage: UsageRecord) -> None:
        self.record_usages([usage])

    def record_usages(self, usages: Sequence[UsageRecord]) -> None:
        """Rows written settled in one go (refusals, and callers without admission)."""
        if not usages:
            return
        rows = []
        daily = _Daily()
        for u in usages:
            ts = u.ts or time.time()
            state = u.state or ("ok" if u.status == 200 else "error")
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
                    state,
                    u.request_id,
                )
            )
            daily.add(u.key_id, ts, u.prompt_tokens, u.completion_tokens, u.cost)
        with self.conn:
            self.conn.executemany(
                "INSERT INTO usage_ledger (ts, key_id, model, prompt_tokens, completion_tokens, "
                "latency_s, status, stream, cost, state, request_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            daily.write(self.conn)

    # -- admission ---------------------------------------------------------------------------

    def reserve(
        self,
        key_id: str,
        now: float,
        decide: Callable[[Spend, Spend], Reservation | None],
        needs_spend: bool = True,
    ) -> Reservation | None:
        conn = self.conn
        with self._admit_lock:
            conn.execute("BEGIN IMMEDIATE")  # the write lock first: nobody admits in between
            try:
                # Without a budget nothing reads the sums: skip both under the write lock.
                if needs_spend:
                    reservation = decide(self.spend(key_id, now), self.reserved(key_id, now))
                else:
                    reservation = decide(Spend(), Spend())
                if reservation is not None:
                    r = reservation
                    conn.execute(
                        "INSERT INTO usage_ledger (ts, key_id, model, prompt_tokens, "
                        "completion_tokens, latency_s, status, stream, cost, state, request_id, "
                        "reserved_prompt, reserved_completion, reserved_cost, owner) "
                        "VALUES (?, ?, ?, 0, 0, 0, 0, ?, 0, 'open', ?, ?, ?, ?, ?)",
                        (
                            r.ts,
                            r.key_id,
                            r.model,
                            int(r.stream),
                            r.request_id,
                            r.prompt_tokens,
                            r.completion_tokens,
                            r.cost,
                            r.owner,
                        ),
                    )
                conn.commit()
            except BaseException:
                conn.rollback()
                raise
        return reservation

    def reserved(self, key_id: str, now: float | None = None) -> Spend:
        """The key's open reservations in the current UTC day and month."""
        now = time.time() if now is None else now
        day, month, next_month = _window_starts(now)
        row = self.conn.execute(
            "SELECT "
            "COALESCE(SUM(CASE WHEN ts >= ? THEN reserved_prompt + reserved_completion END), 0), "
            "COALESCE(SUM(reserved_prompt + reserved_completion), 0), "
            "COALESCE(SUM(CASE WHEN ts >= ? THEN reserved_cost END), 0.0), "
            "COALESCE(SUM(reserved_cost), 0.0) "
            "FROM usage_ledger WHERE state = 'open' AND key_id = ? AND ts >= ? AND ts < ?",
            (day, day, key_id, month, next_month),
        ).fetchone()
        return Spend(day_tokens=row[0], month_tokens=row[1], day_cost=row[2], month_cost=row[3])

    def settle(self, settlements: Sequence[Settlement]) -> None:
        if not settlements:
            return
        daily = _Daily()
        with self.conn:
            for s in settlements:
                cur = self.conn.execute(
                    "UPDATE usage_ledger SET model = ?, prompt_tokens = ?, completion_tokens = ?, "
                    "cost = ?, latency_s = ?, status = ?, state = ? "
                    "WHERE request_id = ? AND state = 'open'",
                    (
                        s.model,
                        s.prompt_tokens,
                        s.completion_tokens,
                        s.cost,
                        s.latency_s,
                        s.status,
                        s.state,
                        s.request_id,
                    ),
                )
                if cur.rowcount == 1:  # not already settled (e.g. interrupted by a restart)
                    daily.add(s.key_id, s.ts, s.prompt_tokens, s.completion_tokens, s.cost)
            daily.write(self.conn)

    def interrupt_open(self, alive: Callable[[str], bool]) -> int:
        with self._admit_lock, self.conn:
            rows = self.conn.execute(
                "SELECT id, owner, key_id, ts, reserved_prompt, reserved_completion, "
                "reserved_cost FROM usage_ledger WHERE state = 'open'"
            ).fetchall()
            dead = [r for r in rows if not alive(r[1] or "")]
            daily = _Daily()
            for _id, _owner, key_id, ts, prompt, completion, cost in dead:
                daily.add(key_id, ts, prompt, completion, cost)
            self.conn.executemany(
                "UPDATE usage_ledger SET state = 'interrupted', prompt_tokens = reserved_prompt, "
                "completion_tokens = reserved_completion, cost = reserved_cost "
                "WHERE id = ? AND state = 'open'",
                [(r[0],) for r in dead],
            )
            daily.write(self.conn)
        return len(dead)

    # -- reading -----------------------------------------------------------------------------

    def spend(self, key_id: str, now: float | None = None) -> Spend:
        now = time.time() if now is None else now
        first, next_first = month_bounds(now)
        today = day_of(now)
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

    def daily_usage(
        self, first_day: str, last_day: str
    ) -> list[tuple[str, str, int, int, float, int]]:
        """Every key's settled usage per UTC day in [first_day, last_day] (YYYY-MM-DD), from
        the daily roll-up: (key_id, day, prompt, completion, cost, requests), by day then key.
        The console's spend charts read this."""
        return self.conn.execute(
            "SELECT key_id, day, prompt_tokens, completion_tokens, cost, requests "
            "FROM usage_daily WHERE day >= ? AND day <= ? ORDER BY day, key_id",
            (first_day, last_day),
        ).fetchall()

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

    def usage_between(self, key_id: str, since: float, until: float) -> dict[str, float]:
        """A key's requests admitted in [since, until] (an agent's turn): their tokens, model
        time (latency_s), count, and how many are still `open` (not settled yet)."""
        row = self.conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(prompt_tokens), 0), "
            "COALESCE(SUM(completion_tokens), 0), COALESCE(SUM(latency_s), 0.0), "
            "COALESCE(SUM(state = 'open'), 0) "
            "FROM usage_ledger WHERE key_id = ? AND ts >= ? AND ts <= ?",
            (key_id, since, until),
        ).fetchone()
        return {
            "requests": row[0],
            "prompt_tokens": row[1],
            "completion_tokens": row[2],
            "latency_s": row[3],
            "open": row[4],
        }

    def usage_rows(self, key_id: str | None = None) -> list[UsageRecord]:
        where, args = ("WHERE key_id = ?", (key_id,)) if key_id else ("", ())
        rows = self.conn.execute(
            "SELECT key_id, model, prompt_tokens, completion_tokens, latency_s, status, stream, "
            f"cost, ts, state, request_id FROM usage_ledger {where} ORDER BY id",
            args,
        ).fetchall()
        return [
            UsageRecord(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), r[7], r[8], r[9], r[10])
            for r in rows
        ]

    def ledger_entries(self, key_id: str | None = None) -> list[dict[str, Any]]:
        """Whole rows, in admission order, with `reserved_tokens` (prompt + completion)."""
        where, args = ("WHERE key_id = ?", (key_id,)) if key_id else ("", ())
        cur = self.conn.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM usage_ledger {where} ORDER BY id", args
        )
        names = [d[0] for d in cur.description]
        out = []
        for row in cur.fetchall():
            entry = dict(zip(names, row, strict=True))
            entry["stream"] = bool(entry["stream"])
            entry["reserved_tokens"] = entry["reserved_prompt"] + entry["reserved_completion"]
            out.append(entry)
        return out
