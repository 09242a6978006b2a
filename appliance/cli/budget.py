"""`appliance budget`: per-key daily and monthly limits, in tokens and/or cost, and the spend."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from appliance.cli.context import control_client
from appliance.cli.options import JsonOpt
from appliance.cli.output import console, print_json

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
    with control_client(ctx) as client:
        report = client.budgets(key)
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
    limits = {
        "daily_tokens": daily_tokens,
        "monthly_tokens": monthly_tokens,
        "daily_cost": daily_cost,
        "monthly_cost": monthly_cost,
    }
    with control_client(ctx) as client:
        report = client.set_budget(key, limits, clear)
    shown = ", ".join(
        f"{lim['budget'].replace('_', ' ')} {lim['limit']:g}" for lim in report["limits"]
    )
    console.print(f"budget of [bold]{report['key']}[/]: {shown or 'no limits'}")
