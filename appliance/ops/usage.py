"""Spend and budget state per key, and recent throughput, read from the store (CLI and status)."""

from __future__ import annotations

import time
from typing import Any

from appliance.errors import NotFoundError
from inference import budgets as budget_math


def budget_report(store: Any, key_filter: str | None = None) -> list[dict[str, Any]]:
    """Every live key (or the one asked for) with its limits, spend and state; also for status."""
    if key_filter is not None:
        key = store.find_key(key_filter)
        if key is None:
            raise NotFoundError(f"no key named or with id {key_filter!r}")
        keys = [key]
    else:
        keys = store.list_keys(include_revoked=False)
    now = time.time()
    out = []
    for key in keys:
        budget = store.get_budget(key.id)
        spend = store.spend(key.id, now)
        held = store.reserved(key.id, now)  # open reservations of requests in flight
        # Limits count what is held too: the state admission gives the smallest request.
        verdict = budget_math.standing(budget, spend, held, now)
        out.append(
            {
                "key": key.name,
                "key_id": key.id,
                "state": verdict.state,
                "spend": {
                    "day_tokens": spend.day_tokens,
                    "month_tokens": spend.month_tokens,
                    "day_cost": round(spend.day_cost, 6),
                    "month_cost": round(spend.month_cost, 6),
                },
                "reserved": {
                    "day_tokens": held.day_tokens,
                    "month_tokens": held.month_tokens,
                    "day_cost": round(held.day_cost, 6),
                    "month_cost": round(held.month_cost, 6),
                },
                "limits": [
                    {
                        "budget": u.name,
                        "used": u.used,
                        "limit": u.limit,
                        "percent": round(u.ratio * 100, 1),
                        "resets_at": budget_math.iso(u.resets_at),
                    }
                    for u in verdict.uses
                ],
            }
        )
    return out


def throughput(store: Any, window_s: float = 60.0) -> dict[str, float]:
    """Tokens per second served through the gateway over the last `window_s` seconds."""
    since = time.time() - window_s
    row = store.conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0) "
        "FROM usage_ledger WHERE ts >= ?",
        (since,),
    ).fetchone()
    return {
        "window_s": window_s,
        "requests": row[0],
        "prompt_tokens_per_s": round(row[1] / window_s, 2),
        "completion_tokens_per_s": round(row[2] / window_s, 2),
    }
