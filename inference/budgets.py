"""Budget math: how much of each limit a key has used, when each window resets, and the verdict.

Pure functions over a Budget and a Spend (inference/ports.py). One function decides: grant(),
what admission acts on; standing(), what `budget show` and status report, is grant() for the
smallest request. Windows are calendar UTC days and months, matching Ledger.spend().
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
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


# -- reservations (admission) ------------------------------------------------------------------


@dataclass(frozen=True)
class Ask:
    """What a request may spend at most, before the budget caps it."""

    prompt_tokens: int  # upper bound of the prompt (inference/gateway/prompt_bound.py)
    completion_tokens: int  # per choice: max_tokens, or the model's context when absent
    choices: int = 1  # n x prompts: each choice generates up to completion_tokens
    prompt_price: float = 0.0  # cost per token
    completion_price: float = 0.0

    def tokens(self, per_choice: int) -> int:
        return self.prompt_tokens + self.choices * per_choice

    def cost(self, per_choice: int) -> float:
        return self.prompt_tokens * self.prompt_price + self.choices * per_choice * (
            self.completion_price
        )

    def smallest(self, use: BudgetUse) -> float:
        """The least this request can reserve against `use`: its prompt and one token."""
        return self.tokens(1) if use.name.endswith("tokens") else self.cost(1)


@dataclass(frozen=True)
class Grant:
    """The admission verdict: admitted with `completion_tokens` per choice (<= the ask's), or
    refused by `blocking`.

    A refusal is `exhausted` when the limit is used up, or the request is of ordinary size: its
    smallest reservation is within what the warning leaves (1 - warn ratio of the limit, 20 %
    by default); a larger request is only refused, so one oversized prompt neither marks the
    key exceeded nor stops it. `spent_out`: the same on settled spend alone, as if every open
    reservation were released: what the audit events and, for a monthly limit, the hard stop
    act on."""

    completion_tokens: int
    uses: list[BudgetUse]  # every limit, used = settled + reservations (+ this one if admitted)
    warnings: list[BudgetUse] = field(default_factory=list)
    blocking: BudgetUse | None = None
    exhausted: bool = False
    spent_out: bool = False

    @property
    def admitted(self) -> bool:
        return self.blocking is None

    @property
    def state(self) -> State:
        if self.blocking is not None and self.exhausted:
            return "monthly_exceeded" if self.blocking.monthly else "daily_exceeded"
        return "warning" if self.warnings else "ok"

    def warning_header(self) -> str | None:
        return ", ".join(w.warning_text() for w in self.warnings) or None


def plus(a: Spend, b: Spend) -> Spend:
    return Spend(
        day_tokens=a.day_tokens + b.day_tokens,
        month_tokens=a.month_tokens + b.month_tokens,
        day_cost=a.day_cost + b.day_cost,
        month_cost=a.month_cost + b.month_cost,
    )


def _room(use: BudgetUse, ask: Ask) -> float:
    """How many completion tokens per choice fit in what is left of `use`."""
    left = use.limit - use.used
    if left <= 0:
        return 0
    if use.name.endswith("tokens"):
        return (left - ask.prompt_tokens) // ask.choices
    left -= ask.prompt_tokens * ask.prompt_price
    if left < 0:
        return 0
    if ask.completion_price <= 0:
        return float("inf")
    return int(left / (ask.choices * ask.completion_price) + 1e-9)


def grant(
    budget: Budget | None,
    settled: Spend,
    reserved: Spend,
    ask: Ask,
    now: float,
    warn_ratio: float = 0.8,
) -> Grant:
    """Cap the ask by every limit (monthly first); refuse when not one completion token fits.
    Limits and warnings count settled spend + open reservations (+ this request's)."""
    if budget is None:
        return Grant(ask.completion_tokens, [])
    committed = uses(budget, plus(settled, reserved), now)
    per_choice: float = ask.completion_tokens
    for use in committed:
        room = _room(use, ask)
        if room < 1:
            ordinary = ask.smallest(use) <= (1 - warn_ratio) * use.limit
            alone = next(u for u in uses(budget, settled, now) if u.name == use.name)
            exhausted = ordinary or use.ratio >= 1.0
            spent_out = alone.ratio >= 1.0 or (ordinary and _room(alone, ask) < 1)
            warnings = [u for u in committed if warn_ratio <= u.ratio < 1.0]
            return Grant(0, committed, warnings, use, exhausted, spent_out)
        per_choice = min(per_choice, room)
    cap = int(per_choice)
    this = Spend(ask.tokens(cap), ask.tokens(cap), ask.cost(cap), ask.cost(cap))
    after = uses(budget, plus(plus(settled, reserved), this), now)
    warnings = [u for u in after if u.ratio >= warn_ratio]
    return Grant(cap, after, warnings)


def standing(
    budget: Budget | None, settled: Spend, reserved: Spend, now: float, warn_ratio: float = 0.8
) -> Grant:
    """Where a key stands (`budget show`): grant() for the smallest request (no prompt, one
    completion token), with its limits and warnings as they are before it. "exceeded" here is
    exactly when admission refuses every request as the budget being used up."""
    ask = Ask(prompt_tokens=0, completion_tokens=1)
    smallest = grant(budget, settled, reserved, ask, now, warn_ratio)
    if budget is None:
        return smallest
    before = uses(budget, plus(settled, reserved), now)
    warnings = [u for u in before if warn_ratio <= u.ratio < 1.0]
    return replace(smallest, uses=before, warnings=warnings)
