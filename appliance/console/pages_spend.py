"""GET /spend: tokens and cost per key and per agent per UTC day over the last 30 days, as SVG
charts (charts.py) and a table; GET /spend.csv the same rows as a CSV download (formula-safe,
spend_data.to_csv). From the ledger's daily roll-up, settled usage only: what budgets count.
GET /fragments/spend is what the page's script re-fetches."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import Response
from markupsafe import Markup

from appliance.console import spend_data
from appliance.console.charts import Format, Series, bar_chart, line_chart, money, tokens
from appliance.console.render import render, render_fragment
from appliance.console.sessions import PageViewer
from appliance.control.api.deps import Principal
from appliance.control.plane import ControlPlane
from appliance.store import open_store
from appliance.store.agent_store import AgentStore

router = APIRouter(include_in_schema=False)

REFRESH_MS = 10_000


def report(plane: ControlPlane, now: float | None = None) -> spend_data.SpendReport:
    """The last DAYS days' spend (a worker thread: it reads the store)."""
    with open_store(plane.config.state_dir) as store:
        agents = AgentStore(store).agents()
    return spend_data.gather(plane.inference, agents, time.time() if now is None else now)


Chart = Callable[..., Markup]  # charts.bar_chart or charts.line_chart


def page_data(spend: spend_data.SpendReport) -> dict[str, Any]:
    """The charts (each with its title, the figure's caption), the table's rows (the newest
    day first, the biggest first within a day) and the totals."""
    days = spend.days
    span = f", {days[0]} to {days[-1]}" if days else ""

    def chart(draw: Chart, ident: str, title: str, series: list[Series], fmt: Format) -> Any:
        unit = "tokens" if fmt is tokens else "cost"
        return {"title": title, "svg": draw(ident, title + span, days, series, unit, fmt)}

    charts = [
        chart(bar_chart, "tokens-by-key", "Tokens per day by key", spend.tokens_by_key(), tokens),
        chart(
            bar_chart, "tokens-by-agent", "Tokens per day by agent", spend.tokens_by_agent(), tokens
        ),
    ]
    totals = spend.totals()
    if totals["cost"]:  # keys without prices cost nothing: no empty cost charts then
        charts += [
            chart(line_chart, "cost-by-key", "Cost per day by key", spend.cost_by_key(), money),
            chart(
                line_chart, "cost-by-agent", "Cost per day by agent", spend.cost_by_agent(), money
            ),
        ]
    rows = sorted(spend.rows, key=lambda r: (r.day, r.tokens), reverse=True)
    return {"charts": charts, "rows": rows, "totals": totals, "days": days, "money": money}


async def _data(request: Request) -> dict[str, Any]:
    spend = await anyio.to_thread.run_sync(report, request.app.state.plane)
    return page_data(spend)


@router.get("/spend")
async def spend_page(request: Request, who: Principal = PageViewer) -> Response:
    return render(request, "spend.html", refresh_ms=REFRESH_MS, **await _data(request))


@router.get("/fragments/spend")
async def spend_fragment(request: Request, who: Principal = PageViewer) -> Response:
    return render_fragment(request, "_spend.html", **await _data(request))


@router.get("/spend.csv")
async def spend_csv(request: Request, who: Principal = PageViewer) -> Response:
    spend = await anyio.to_thread.run_sync(report, request.app.state.plane)
    last = spend.days[-1] if spend.days else "empty"
    return Response(
        spend_data.to_csv(spend),
        media_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="spend-{last}.csv"',
            "Cache-Control": "no-store",
        },
    )
