"""`appliance budget`: per-key daily and monthly limits, in tokens and/or cost, and the spend."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated

import typer
from rich.table import Table

from appliance.cli.keys import open_inference_store
from appliance.cli.options import JsonOpt
from appliance.cli.output import console, print_json
from appliance.errors import NotFoundError
from appliance.ops.usage import budget_report
from inference.ports import Budget

app = typer.Typer(help="Show and set per-key inference budgets.", no_args_is_help=True)

KeyArg = Annotated[str, typer.Argument(help="Key name or id.", metavar="KEY")]


@app.command("show")
def show(
    ctx: typer.Context,
    key: Annotated[str | None, typer.Argument(help="Key name or id (default: every key).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Show each key's limits, what it spent today and this month (UTC), and its state. Limits
    count the reservations of requests in flight too ("held")."""
    with open_inference_store(ctx) as store:
        report = budget_report(store, key)
    if json_out:
        print_json(report)
        return
    if not report:
        console.print("no keys yet: `appliance keys create NAME`")
        return
    colour = {"ok": "green", "warning": "yellow"}
    table = Table("key", "state", "today", "this month", "held", "limits", box=None)
    for row in report:
        s = row["spend"]
        limits = ", ".join(
            f"{lim['budget'].replace('_', ' ')} {lim['percent']:.0f}% of {lim['limit']:g}"
            for lim in row["limits"]
        )
        state = f"[{colour.get(row['state'], 'red')}]{row['state']}[/]"
        held = row["reserved"]["month_tokens"]
        table.add_row(
            row["key"],
            state,
            f"{s['day_tokens']} tok ${s['day_cost']:.4f}",
            f"{s['month_tokens']} tok ${s['month_cost']:.4f}",
            f"{held} tok" if held else "-",
            limits or "-",
        )
    console.print(table)


@app.command("set")
def set_budget(
    ctx: typer.Context,
    key: KeyArg,
    daily_tokens: Annotated[int | None, typer.Option(min=0, help="Tokens per UTC day.")] = None,
    monthly_tokens: Annotated[
        int | None, typer.Option(min=0, help="Tokens per UTC month (a hard stop).")
    ] = None,
    daily_cost: Annotated[float | None, typer.Option(min=0, help="Cost per UTC day.")] = None,
    monthly_cost: Annotated[
        float | None, typer.Option(min=0, help="Cost per UTC month (a hard stop).")
    ] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Remove every limit first.")] = False,
) -> None:
    """Set limits; the ones not given keep their value (use --clear to start over)."""
    with open_inference_store(ctx) as store:
        record = store.find_key(key)
        if record is None or record.revoked_at is not None:
            raise NotFoundError(
                f"no live key named or with id {key!r}", hint="`appliance keys list`"
            )
        current = (None if clear else store.get_budget(record.id)) or Budget(record.id)
        changes = {
            "daily_tokens": daily_tokens,
            "monthly_tokens": monthly_tokens,
            "daily_cost": daily_cost,
            "monthly_cost": monthly_cost,
        }
        budget = replace(current, **{k: v for k, v in changes.items() if v is not None})
        store.set_budget(budget)
        report = budget_report(store, record.id)[0]
    limits = ", ".join(
        f"{lim['budget'].replace('_', ' ')} {lim['limit']:g}" for lim in report["limits"]
    )
    console.print(f"budget of [bold]{record.name}[/]: {limits or 'no limits'}")
