"""`appliance doctor`: preflight checks of this host, each failure with its fix."""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.table import Table

from appliance.cli.context import app_context
from appliance.cli.options import JsonOpt
from appliance.cli.output import console, print_json
from appliance.errors import PreflightError, exit_code_for
from appliance.ops.doctor import CheckResult, DoctorEnv, all_ok, run_checks

_MARK = {
    "ok": "[green]✓ ok[/]",
    "warn": "[yellow]! warn[/]",
    "fail": "[red]✗ fail[/]",
    "skip": "[dim]– skip[/]",  # noqa: RUF001 (the en dash is meant)
}


def render_checks(results: list[CheckResult]) -> None:
    table = Table(show_edge=False, pad_edge=False)
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail")
    for r in results:
        table.add_row(r.name, _MARK[r.status], escape(r.detail))
    console.print(table)
    fixes = [r for r in results if r.status in ("warn", "fail") and r.fix]
    if fixes:
        console.print()
    for r in fixes:
        colour = "red" if r.status == "fail" else "yellow"
        console.print(f"[{colour}]fix {escape(r.name)}:[/] {escape(r.fix or '')}", soft_wrap=True)
    failed = sum(r.status == "fail" for r in results)
    warned = sum(r.status == "warn" for r in results)
    summary = f"{failed} failed, {warned} warning{'s' if warned != 1 else ''}"
    console.print(f"\n[{'red' if failed else 'green'}]{summary}[/]")


def doctor(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """Check that this host can serve a model and run sandboxes; print how to fix each failure."""
    from appliance.cli.plan import current_plan
    from hardware.telemetry import collect

    host = collect()
    env = DoctorEnv(config=app_context(ctx).config(), host=host)
    plan = env.plan = current_plan(ctx, host)
    if plan.memory is not None:
        # weights_gib is per GPU after tensor parallelism; the disk holds all shards.
        env.required_gib = plan.memory.weights_gib * plan.tensor_parallel_size
        env.required_for = plan.variant

    results = run_checks(env)
    ok = all_ok(results)
    if json_out:
        print_json({"ok": ok, "checks": results})
    else:
        render_checks(results)
    if not ok:
        raise typer.Exit(exit_code_for(PreflightError("")))
