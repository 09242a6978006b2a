"""Spend per key and per agent per UTC day over the last days (GET /api/v1/spend, the console's
Spend page and its CSV export), from the ledger's daily roll-up: usage_daily, settled usage
only, what budgets count.

An agent's spend is its sandbox's key's (`sandbox-NAME`, owned by the sandbox): the key the
egress proxy injects for it. Pure functions over rows, plus `gather`/`report` that read them.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from appliance.store import open_store
from appliance.store.agent_store import AgentStore
from inference.ports import KeyRecord
from sandbox.names import SANDBOX_KEY_PREFIX

DAYS = 30
# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection): such a
# cell gets a leading apostrophe. Tab and CR too (OWASP): some programs strip them first.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
CSV_COLUMNS = (
    "day",
    "key",
    "key_id",
    "owner_kind",
    "agent",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost",
    "requests",
)


def day_range(now: float, days: int = DAYS) -> list[str]:
    """The last `days` UTC days up to today's, oldest first (YYYY-MM-DD)."""
    today = datetime.fromtimestamp(now, UTC).date()
    return [(today - timedelta(days=back)).isoformat() for back in range(days - 1, -1, -1)]


@dataclass(frozen=True)
class KeyLabel:
    key_id: str
    name: str
    owner_kind: str
    agent: str | None  # the agent whose sandbox owns the key
    revoked: bool


def key_labels(keys: Iterable[KeyRecord], agents: Iterable[str]) -> dict[str, KeyLabel]:
    """Each key (revoked ones too: their past spend still shows) by id, with its agent."""
    names = set(agents)
    out = {}
    for key in keys:
        owner = (
            key.name.removeprefix(SANDBOX_KEY_PREFIX)
            if key.owner_kind == "sandbox" and key.name.startswith(SANDBOX_KEY_PREFIX)
            else None
        )
        out[key.id] = KeyLabel(
            key.id, key.name, key.owner_kind, owner if owner in names else None,
            key.revoked_at is not None,
        )  # fmt: skip
    return out


@dataclass(frozen=True)
class SpendRow:
    day: str
    key: KeyLabel
    prompt_tokens: int
    completion_tokens: int
    cost: float
    requests: int

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class SpendReport:
    days: list[str]
    rows: list[SpendRow]  # by day, then key name; only (key, day) pairs with usage

    def _series(self, label_of: Any, value_of: Any) -> dict[str, tuple[float, ...]]:
        """label -> one value per day (a chart's series), by label."""
        index = {day: i for i, day in enumerate(self.days)}
        sums: dict[str, list[float]] = {}
        for row in self.rows:
            label = label_of(row)
            if label is None:
                continue
            sums.setdefault(label, [0.0] * len(self.days))[index[row.day]] += value_of(row)
        return {label: tuple(values) for label, values in sorted(sums.items())}

    def tokens_by_key(self) -> dict[str, tuple[float, ...]]:
        return self._series(lambda r: r.key.name, lambda r: r.tokens)

    def cost_by_key(self) -> dict[str, tuple[float, ...]]:
        return self._series(lambda r: r.key.name, lambda r: r.cost)

    def tokens_by_agent(self) -> dict[str, tuple[float, ...]]:
        return self._series(lambda r: r.key.agent, lambda r: r.tokens)

    def cost_by_agent(self) -> dict[str, tuple[float, ...]]:
        return self._series(lambda r: r.key.agent, lambda r: r.cost)

    def as_dict(self) -> dict[str, Any]:
        """What GET /api/v1/spend answers: the days, a row per key and day with usage, totals."""
        return {
            "days": self.days,
            "rows": [
                {
                    "day": r.day,
                    "key": r.key.name,
                    "key_id": r.key.key_id,
                    "owner_kind": r.key.owner_kind,
                    "agent": r.key.agent,
                    "prompt_tokens": r.prompt_tokens,
                    "completion_tokens": r.completion_tokens,
                    "tokens": r.tokens,
                    "cost": round(r.cost, 6),
                    "requests": r.requests,
                }
                for r in self.rows
            ],
            "totals": self.totals(),
        }

    def totals(self) -> dict[str, float]:
        return {
            "prompt_tokens": sum(r.prompt_tokens for r in self.rows),
            "completion_tokens": sum(r.completion_tokens for r in self.rows),
            "tokens": sum(r.tokens for r in self.rows),
            "cost": sum(r.cost for r in self.rows),
            "requests": sum(r.requests for r in self.rows),
        }


def build_report(
    days: Sequence[str],
    usage: Iterable[tuple[str, str, int, int, float, int]],
    labels: dict[str, KeyLabel],
) -> SpendReport:
    """usage_daily rows (key_id, day, prompt, completion, cost, requests) as a report; rows
    outside `days` are left out, a key no longer in the store is shown by its id."""
    wanted = set(days)
    rows = []
    for key_id, day, prompt, completion, cost, requests in usage:
        if day not in wanted:
            continue
        label = labels.get(key_id) or KeyLabel(key_id, key_id, "unknown", None, True)
        rows.append(SpendRow(day, label, int(prompt), int(completion), float(cost), int(requests)))
    rows.sort(key=lambda r: (r.day, r.key.name, r.key.key_id))
    return SpendReport(list(days), rows)


def gather(store: Any, agents: Iterable[str], now: float, days: int = DAYS) -> SpendReport:
    """The report over the InferenceStore `store` (its ledger and keys) for the last `days`."""
    span = day_range(now, days)
    labels = key_labels(store.list_keys(include_revoked=True), agents)
    return build_report(span, store.daily_usage(span[0], span[-1]), labels)


def report(state_dir: Path, store: Any, now: float | None = None, days: int = DAYS) -> SpendReport:
    """`gather` for the state dir's agents (a worker thread: it reads the store)."""
    with open_store(state_dir) as db:
        agents = AgentStore(db).agents()
    return gather(store, agents, time.time() if now is None else now, days)


def safe_cell(value: object) -> str:
    """A CSV cell a spreadsheet shows as text: formula-like text gets a leading '."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def to_csv(report: SpendReport) -> str:
    """One line per key and day (RFC 4180 quoting; every text cell formula-guarded)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for r in report.rows:
        writer.writerow(
            [
                r.day,
                safe_cell(r.key.name),
                safe_cell(r.key.key_id),
                safe_cell(r.key.owner_kind),
                safe_cell(r.key.agent or ""),
                r.prompt_tokens,
                r.completion_tokens,
                r.tokens,
                f"{r.cost:.6f}",
                r.requests,
            ]
        )
    return out.getvalue()
