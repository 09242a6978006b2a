"""The Agents page's data: one summary per agent from what the plane's services answer (the
inventory, each key's budget report, each agent's schedule view and transcript), pure functions
so each piece is tested without a sandbox.

Viewers see a turn's when, trigger, actor, outcome and tokens (the audit log holds those too);
its message and reply only operators see (GET /api/v1/agents/NAME/transcript is operator-only).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sandbox.names import SANDBOX_KEY_PREFIX

LAST_TURNS = 3  # on the list
TRANSCRIPT_TURNS = 20  # on an agent's page, newest first (it refreshes every 2 s)
TEXT_SHOWN = 20_000  # characters of a message or reply on the page (a reply may be a MiB)
GAUGES = (  # (limit, what is spent against it, its label)
    ("daily_tokens", "day_tokens", "tokens today"),
    ("monthly_tokens", "month_tokens", "tokens this month"),
    ("daily_cost", "day_cost", "cost today"),
    ("monthly_cost", "month_cost", "cost this month"),
)
WARN_RATIO = 0.8  # where the gateway warns (inference/budgets.py standing's default)


def _number(value: Any) -> float | None:
    """A time or a length as the page's filters take it; None for what is not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True)
class Gauge:
    label: str
    used: float
    limit: float
    is_cost: bool

    @property
    def percent(self) -> float:
        return round(100 * self.used / self.limit, 1) if self.limit > 0 else 100.0

    @property
    def low(self) -> float:  # <meter>'s regions: warned from here
        return self.limit * WARN_RATIO

    @property
    def text(self) -> str:
        if self.is_cost:
            return f"{self.used:,.4f} of {self.limit:,.4f} ({self.percent:g}%)"
        return f"{self.used:,.0f} of {self.limit:,.0f} ({self.percent:g}%)"


def gauges(report: dict[str, Any] | None) -> list[Gauge]:
    """A key's budget report (ops/usage.budget_report) as one gauge per limit it sets."""
    if report is None:
        return []
    spend = report.get("spend") or {}
    limits = {u["budget"]: u for u in report.get("limits") or []}
    out = []
    for limit_name, spent_name, label in GAUGES:
        use = limits.get(limit_name)
        if use is None:
            continue
        used = float(use.get("used", spend.get(spent_name, 0)))
        out.append(Gauge(label, used, float(use["limit"]), limit_name.endswith("cost")))
    return out


@dataclass(frozen=True)
class TurnLine:
    ts: float | None
    trigger: str
    actor: str
    outcome: str  # ok | failed | cancelled | refused
    tokens: int | None
    duration_s: float | None
    message: str
    reply: str
    detail: str  # the error, or why it was refused


def turn_line(record: dict[str, Any]) -> TurnLine:
    """One transcript line as the page shows it (missing fields read as empty)."""
    if record.get("refused"):
        outcome, detail = "refused", str(record["refused"])
    elif record.get("cancelled"):
        outcome, detail = "cancelled", str(record.get("error") or "")
    elif record.get("ok"):
        outcome, detail = "ok", ""
    else:
        outcome, detail = "failed", str(record.get("error") or "")
    tokens = record.get("tokens")
    total = tokens.get("total") if isinstance(tokens, dict) else None
    return TurnLine(
        ts=_number(record.get("ts")),
        trigger=str(record.get("trigger") or ""),
        actor=str(record.get("actor") or ""),
        outcome=outcome,
        tokens=total if isinstance(total, int) else None,
        duration_s=_number(record.get("duration_s")),
        message=_cut(str(record.get("message") or "")),
        reply=_cut(str(record.get("reply") or "")),
        detail=detail,
    )


def _cut(text: str) -> str:
    """At most TEXT_SHOWN characters, saying how many more the transcript holds."""
    if len(text) <= TEXT_SHOWN:
        return text
    return f"{text[:TEXT_SHOWN]}… [{len(text) - TEXT_SHOWN:,} more characters in the transcript]"


def last_turns(transcript: Sequence[dict[str, Any]], count: int) -> list[TurnLine]:
    """The newest `count` turns, newest first."""
    return [turn_line(r) for r in reversed(transcript[-count:])] if count > 0 else []


@dataclass(frozen=True)
class ScheduleLine:
    """An agent's schedule in one line: its entries, the next run and the last."""

    entries: int = 0
    next_run_at: float | None = None
    last_run_at: float | None = None
    last_outcome: str | None = None
    error: str | None = None  # the schedule could not be read (the blueprint is gone)


def schedule_line(view: list[dict[str, Any]]) -> ScheduleLine:
    """ScheduleService.view's entries summed up: the soonest next run, the latest last run."""
    planned = [e for e in view if e.get("next_run_at") is not None]
    ran = [e for e in view if e.get("last_run_at") is not None]
    latest = max(ran, key=lambda e: e["last_run_at"]) if ran else None
    return ScheduleLine(
        entries=len(view),
        next_run_at=min(e["next_run_at"] for e in planned) if planned else None,
        last_run_at=latest["last_run_at"] if latest else None,
        last_outcome=latest.get("last_outcome") if latest else None,
    )


@dataclass(frozen=True)
class AgentSummary:
    name: str
    blueprint: str  # NAME@VERSION
    state: str  # the sandbox's: running, stopped, killed, missing...
    runtime: str | None  # the supervisor's report of the runtime, when running
    uptime_s: float | None  # since the sandbox last changed state, while it runs
    turns: int
    last_activity: float | None
    gauges: list[Gauge]
    spend: dict[str, float] | None  # its key's day_tokens, month_tokens, day_cost, month_cost
    schedule: ScheduleLine
    last_turns: list[TurnLine] = field(default_factory=list)


def summary(
    row: dict[str, Any],
    budget: dict[str, Any] | None,
    schedule: ScheduleLine,
    transcript: Sequence[dict[str, Any]],
    now: float | None = None,
    turns_shown: int = LAST_TURNS,
) -> AgentSummary:
    """One inventory row (AgentManager.inventory) with its key's budget report."""
    now = time.time() if now is None else now
    since = row.get("since")
    running = row.get("state") == "running"
    runtime = row.get("runtime")
    return AgentSummary(
        name=str(row["name"]),
        blueprint=str(row.get("blueprint") or "?"),
        state=str(row.get("state") or "unknown"),
        runtime=str(runtime["state"]) if isinstance(runtime, dict) else None,
        uptime_s=now - since if running and isinstance(since, int | float) else None,
        turns=int(row.get("turns") or 0),
        last_activity=_number(row.get("last_activity")),
        gauges=gauges(budget),
        spend=(budget or {}).get("spend"),
        schedule=schedule,
        last_turns=last_turns(transcript, turns_shown),
    )


def budgets_by_agent(
    reports: list[dict[str, Any]], keys: list[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Each budget report of a sandbox's own key (`sandbox-NAME`, owner kind sandbox: a client
    key may have such a name too), by the sandbox's name. `keys`: KeyService.list()."""
    owned = {k["id"] for k in keys if k.get("owner_kind") == "sandbox"}
    return {
        r["key"][len(SANDBOX_KEY_PREFIX) :]: r
        for r in reports
        if r.get("key_id") in owned and str(r.get("key", "")).startswith(SANDBOX_KEY_PREFIX)
    }
