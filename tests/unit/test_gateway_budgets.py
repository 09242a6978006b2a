"""Budget math: windows, resets, warning at the ratio, daily refusal, monthly hard stop first."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from inference import budgets as b
from inference.ports import Budget, Spend


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


NOW = ts("2026-03-15T18:30:00")


def evaluate(budget: Budget | None, spend: Spend, now: float, warn_ratio: float = 0.8) -> b.Grant:
    """Where a key stands with this settled spend and nothing in flight."""
    return b.standing(budget, spend, Spend(), now, warn_ratio)


def test_resets_are_next_utc_midnight_and_first_of_month() -> None:
    assert b.iso(b.day_reset(NOW)) == "2026-03-16T00:00:00Z"
    assert b.iso(b.month_reset(NOW)) == "2026-04-01T00:00:00Z"
    assert b.iso(b.month_reset(ts("2026-12-31T23:59:59"))) == "2027-01-01T00:00:00Z"
    assert b.iso(b.day_reset(ts("2026-02-28T00:00:00"))) == "2026-03-01T00:00:00Z"


def test_no_budget_is_always_ok() -> None:
    assert evaluate(None, Spend(day_tokens=10**9), NOW).state == "ok"
    assert evaluate(Budget("k"), Spend(day_tokens=10**9), NOW).state == "ok"


def test_below_the_warn_ratio_is_ok() -> None:
    v = evaluate(Budget("k", daily_tokens=10_000), Spend(day_tokens=7_999), NOW)
    assert v.state == "ok" and v.warning_header() is None and v.blocking is None


def test_warning_at_80_percent_names_the_budget() -> None:
    v = evaluate(Budget("k", daily_tokens=10_000), Spend(day_tokens=8_300), NOW)
    assert v.state == "warning"
    assert v.warning_header() == "daily tokens 83% of 10000"
    (use,) = v.warnings
    assert use.period() == "2026-03-15"


def test_several_warnings_in_one_header() -> None:
    budget = Budget("k", daily_tokens=100, monthly_cost=10.0)
    v = evaluate(budget, Spend(day_tokens=90, month_tokens=90, month_cost=8.5), NOW)
    assert v.warning_header() == "monthly cost 85% of 10.00, daily tokens 90% of 100"
    assert [w.period() for w in v.warnings] == ["2026-03", "2026-03-15"]


def test_custom_warn_ratio() -> None:
    budget = Budget("k", daily_tokens=100)
    assert evaluate(budget, Spend(day_tokens=60), NOW, warn_ratio=0.5).state == "warning"


def test_daily_limit_refuses_until_midnight() -> None:
    v = evaluate(Budget("k", daily_tokens=1000), Spend(day_tokens=1000), NOW)
    assert v.state == "daily_exceeded"
    assert v.blocking is not None and v.blocking.name == "daily_tokens"
    assert b.iso(v.blocking.resets_at) == "2026-03-16T00:00:00Z"


def test_monthly_cap_wins_over_daily() -> None:
    budget = Budget("k", daily_tokens=100, monthly_tokens=1000)
    v = evaluate(budget, Spend(day_tokens=500, month_tokens=1000), NOW)
    assert v.state == "monthly_exceeded" and v.blocking is not None
    assert v.blocking.name == "monthly_tokens" and v.blocking.period() == "2026-03"


def test_cost_limits() -> None:
    v = evaluate(Budget("k", daily_cost=2.0), Spend(day_cost=2.5), NOW)
    assert v.state == "daily_exceeded" and v.blocking is not None
    assert v.blocking.amount(v.blocking.used) == "2.50"


def test_zero_limit_blocks_at_once() -> None:
    assert evaluate(Budget("k", monthly_tokens=0), Spend(), NOW).state == "monthly_exceeded"


@pytest.mark.parametrize("used", [0, 1, 799, 800, 999, 1000, 5000])
def test_state_is_monotonic_in_spend(used: int) -> None:
    state = evaluate(Budget("k", daily_tokens=1000), Spend(day_tokens=used), NOW).state
    expected = "ok" if used < 800 else "warning" if used < 1000 else "daily_exceeded"
    assert state == expected


@pytest.mark.parametrize(
    ("settled", "held"), [(0, 0), (500, 299), (500, 300), (0, 999), (400, 600)]
)
def test_standing_counts_reservations_and_agrees_with_admission(settled: int, held: int) -> None:
    """`budget show`'s state is what admission answers the smallest request (one token)."""
    budget = Budget("k", daily_tokens=1000)
    spent, reserved = Spend(day_tokens=settled), Spend(day_tokens=held)
    state = b.standing(budget, spent, reserved, NOW).state
    smallest = b.grant(budget, spent, reserved, b.Ask(prompt_tokens=0, completion_tokens=1), NOW)
    total = settled + held
    assert state == ("ok" if total < 800 else "warning" if total < 1000 else "daily_exceeded")
    assert smallest.admitted == (state != "daily_exceeded")
    assert [u.used for u in b.standing(budget, spent, reserved, NOW).uses] == [total]
