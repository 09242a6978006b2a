"""Budget math: how much of each limit a key has used, when each window resets, and the verdict.

Pure functions over a Budget and a Spend (inference/ports.py); the gateway acts on the verdict.
Windows are calendar UTC days and months, matching Ledger.spend().
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

from inference.ports import Budget, Spend

BudgetName = Literal["daily_tokens", "monthly_tokens", "daily_cost", "monthly_cost"]
State = Literal["ok", "warning", "daily_exceeded", "monthly_exceeded"]

# Gauge values for the budget state metric, worst last.
STATE_VALUE: dict[State, int] = {
    "ok": 0,
    "warning": 1,
    "daily_exceeded": 2,
    "monthly_exceeded": 3,
}

_ORDER: tuple[BudgetName, ...] = ("monthly_tokens", "monthly_cost", "daily_tokens", "daily_cost")


@dataclass(frozen=True)
class BudgetUse:
    name: BudgetName
    used: float
    limit: float
    resets_at: datetime

    @property
    def label(self) -> str:
        return self.name.replace("_", " ")  # "daily tokens"

    @property
    def monthly(self) -> bool:
        return self.name.startswith("monthly")

    @property
    def ratio(self) -> float:
        return self.used / self.limit if self.limit > 0 else float("inf")

    def amount(self, value: float) -> str:
        return f"{value:.2f}" if self.name.endswith("cost") else str(int(value))

    def warning_text(self) -> str:
        # e.g. "daily tokens 83% of 10000"
        return f"{self.label} {int(self.ratio * 100)}% of {self.amount(self.limit)}"

    def period(self) -> str:
        """The window this use belongs to: "2026-11-18" for daily, "2026-11" for monthly."""
        start = self.resets_at - timedelta(seconds=1)
        return start.strftime("%Y-%m") if self.monthly else start.strftime("%Y-%m-%d")


@dataclass(frozen=True)
class Verdict:
    state: State
    uses: list[BudgetUse] = field(default_factory=list)  # every configured limit
    warnings: list[BudgetUse] = field(default_factory=list)  # >= warn ratio, < 100 %
    blocking: BudgetUse | None = None  # the exhausted limit that refuses the request

    def warning_header(self) -> str | None:
        return ", ".join(w.warning_text() for w in self.warnings) or None

    def refusal_message(self, key_name: str) -> str:
        b = self.blocking
        assert b is not None
        what = "monthly cap reached, key stopped" if b.monthly else "daily budget exhausted"
        return (
            f"budget exceeded for key '{key_name}': {b.label} "
            f"{b.amount(b.used)} of {b.amount(b.limit)} used ({what}); "
            f"resets at {iso(b.resets_at)}"
        )

    def retry_after_s(self, now: float) -> int:
        assert self.blocking is not None
        return max(1, int(self.blocking.resets_at.timestamp() - now + 0.999))


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def day_reset(now: float) -> datetime:
    today = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today + timedelta(days=1)


def month_reset(now: float) -> datetime:
    t = datetime.fromtimestamp(now, UTC)
    year, month = (t.year + 1, 1) if t.month == 12 else (t.year, t.month + 1)
    return datetime(year, month, 1, tzinfo=UTC)


def uses(budget: Budget, spend: Spend, now: float) -> list[BudgetUse]:
    """Every limit the budget sets, with what was spent against it (monthly first)."""
    values: dict[BudgetName, tuple[float | None, float, datetime]] = {
        "monthly_tokens": (budget.monthly_tokens, spend.month_tokens, month_reset(now)),
        "monthly_cost": (budget.monthly_cost, spend.month_cost, month_reset(now)),
        "daily_tokens": (budget.daily_tokens, spend.day_tokens, day_reset(now)),
        "daily_cost": (budget.daily_cost, spend.day_cost, day_reset(now)),
    }
    out = []
    for name in _ORDER:
        limit, used, resets = values[name]
        if limit is not None:
            out.append(BudgetUse(name, float(used), float(limit), resets))
    return out


def evaluate(budget: Budget | None, spend: Spend, now: float, warn_ratio: float = 0.8) -> Verdict:
    """Monthly caps win over daily ones: a key over both is hard-stopped, not just throttled."""
    if budget is None:
        return Verdict("ok")
    all_uses = uses(budget, spend, now)
    for use in all_uses:  # ordered monthly first
        if use.ratio >= 1.0:
            state: State = "monthly_exceeded" if use.monthly else "daily_exceeded"
            return Verdict(state, all_uses, blocking=use)
    warnings = [u for u in all_uses if u.ratio >= warn_ratio]
    return Verdict("warning" if warnings else "ok", all_uses, warnings)
