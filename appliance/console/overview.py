"""GET / (Overview): the host and its GPUs' live telemetry, the backend and gateway, tokens/s,
held requests and the agents at a glance; GET /fragments/overview is the part the page's script
re-fetches every 2 s (no full reload). Both from the status report (`plane.status()`, what
`appliance status --json` prints), gathered off the event loop (shared_read.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from appliance.console.render import render, render_fragment
from appliance.console.sessions import PageViewer
from appliance.control.api.deps import Principal

router = APIRouter(include_in_schema=False)

REFRESH_MS = 2000


async def status_report(request: Request) -> dict[str, Any]:
    plane = request.app.state.plane
    return await request.app.state.console.status.get(plane.status)


def tokens_per_s(report: dict[str, Any]) -> dict[str, Any]:
    """The backend's generation rate (vLLM's counter) and the gateway's last minute."""
    metrics = (report.get("inference") or {}).get("metrics") or {}
    rate = metrics.get("generation_rate") or {}
    served = (report.get("budgets") or {}).get("throughput") or {}
    return {
        "backend": rate.get("tokens_per_s"),
        "backend_reason": rate.get("reason"),
        "gateway_completion": served.get("completion_tokens_per_s"),
        "gateway_prompt": served.get("prompt_tokens_per_s"),
        "gateway_requests": served.get("requests"),
        "window_s": served.get("window_s"),
    }


async def _overview(request: Request) -> dict[str, Any]:
    report = await status_report(request)
    return {"report": report, "rate": tokens_per_s(report), "refresh_ms": REFRESH_MS}


@router.get("/")
async def overview(request: Request, who: Principal = PageViewer) -> Response:
    return render(request, "overview.html", **await _overview(request))


@router.get("/fragments/overview")
async def overview_fragment(request: Request, who: Principal = PageViewer) -> Response:
    return render_fragment(request, "_overview.html", **await _overview(request))
