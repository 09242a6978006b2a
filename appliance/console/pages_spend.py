"""GET /spend: tokens and cost per key and per agent per UTC day over the last 30 days, as SVG
charts (charts.py) and a table; GET /spend.csv the same rows as a CSV download (formula-safe,
ops/spend.py to_csv). From the ledger's daily roll-up, settled usage only: what budgets count.
GET /fragments/spend is what the page's script re-fetches."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import Response
from markupsafe import Markup

from appliance.console.charts import Format, Series, bar_chart, line_chart, money, tokens
from appliance.console.render import render, render_fragment
from appliance.console.sessions import PageViewer
from appliance.control.api.deps import Principal
from appliance.control.plane import ControlPlane
from appliance.ops import spend

router = APIRouter(include_in_schema=False)

REFRESH_MS = 10_000


def report(plane: ControlPlane) -> spend.SpendReport:
    """The last DAYS days' spend, as GET /api/v1/spend answers it (a worker thread)."""
    return spend.report(plane.config.state_dir, plane.inference)


Chart = Callable[..., Markup]  # charts.bar_chart or charts.line_chart
Values = tuple[float, ...]  # one per day


def page_data(usage: spend.SpendReport) -> dict[str, Any]:
    """The charts (each with its title, the figure's caption), the table's rows (the newest
    day first, the biggest first within a day) and the totals."""
    days = usage.days
    span = f", {days[0]} to {days[-1]}" if days else ""

    def chart(draw: Chart, ident: str, title: str, by: dict[str, Values], fmt: Format) -> Any:
        unit = "tokens" if fmt is tokens else "cost"
        series = [Series(label, values) for label, values in by.items()]
        return {"title": title, "svg": draw(ident, title + span, days, series, unit, fmt)}

    charts = [
        chart(bar_chart, "tokens-by-key", "Tokens per day by key", usage.tokens_by_key(), tokens),
        chart(
            bar_chart, "tokens-by-agent", "Tokens per day by agent", usage.tokens_by_agent(), tokens
        ),
    ]
    totals = usage.totals()
    if totals["cost"]:  # keys without prices cost nothing: no empty cost charts then
        charts += [
            chart(line_chart, "cost-by-key", "Cost per day by key", usage.cost_by_key(), money),
            chart(
                line_chart, "cost-by-agent", "Cost per day by agent", usage.cost_by_agent(), money
            ),
        ]
    rows = sorted(usage.rows, key=lambda r: (r.day, r.tokens), reverse=True)
    return {"charts": charts, "rows": rows, "totals": totals, "days": days, "money": money}


async def _data(request: Request) -> dict[str, Any]:
    return page_data(await anyio.to_thread.run_sync(report, request.app.state.plane))


@router.get("/spend")
async def spend_page(request: Request, who: Principal = PageViewer) -> Response:
    return render(request, "spend.html", refresh_ms=REFRESH_MS, **await _data(request))


@router.get("/fragments/spend")
async def spend_fragment(request: Request, who: Principal = PageViewer) -> Response:
    return render_fragment(request, "_spend.html", **await _data(request))


@router.get("/spend.csv")
async def spend_csv(request: Request, who: Principal = PageViewer) -> Response:
    usage = await anyio.to_thread.run_sync(report, request.app.state.plane)
    last = usage.days[-1] if usage.days else "empty"
    return Response(
        spend.to_csv(usage),
        media_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="spend-{last}.csv"',
            "Cache-Control": "no-store",
        },
    )
