"""Templates: one Jinja2 environment over appliance/console/templates, autoescaped (a sandbox's
host name or an agent's name is data, never markup), and `render`, which gives every template
the session's operator, role, CSRF token and flash messages.

Filters for what the status report holds: ages and times left in seconds, byte and MiB sizes,
percentages, wall-clock times (UTC), and "—" for what is unknown (None is never shown as 0).
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import ChainableUndefined, Environment, PackageLoader, select_autoescape

from appliance.console.sessions import Session

DASH = "—"

env = Environment(
    loader=PackageLoader("appliance.console", "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    undefined=ChainableUndefined,  # a section missing from the status report renders as "—"
    trim_blocks=True,
    lstrip_blocks=True,
)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def duration(seconds: Any) -> str:
    """3 s, 4 min 10 s, 2 h 5 min, 3 d 4 h."""
    s = _number(seconds)
    if s is None:
        return DASH
    s = max(0, int(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s" if s < 600 and s % 60 else f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def since(timestamp: Any, now: float | None = None) -> str:
    """How long ago a wall-clock timestamp was."""
    t = _number(timestamp)
    return DASH if t is None else duration((now or time.time()) - t)


def until(timestamp: Any, now: float | None = None) -> str:
    """How long until a wall-clock timestamp; "expired" once passed."""
    t = _number(timestamp)
    if t is None:
        return DASH
    left = t - (now or time.time())
    return duration(left) if left > 0 else "expired"


def size_bytes(value: Any) -> str:
    n = _number(value)
    if n is None:
        return DASH
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return DASH  # unreachable


def size_mib(value: Any) -> str:
    n = _number(value)
    return DASH if n is None else size_bytes(n * 1024 * 1024)


def percent(value: Any, of: Any = None) -> str:
    """`percent(42)` -> "42%"; `percent(used, total)` -> the share; a ratio in [0, 1] with
    of=1 -> its percentage."""
    n = _number(value)
    if n is None:
        return DASH
    if of is not None:
        total = _number(of)
        if not total:
            return DASH
        n = 100.0 * n / total
    return f"{n:.0f}%"


def share(value: Any, of: Any) -> float:
    """0..100 for a <meter> (0 when unknown: the text next to it says "—")."""
    n, total = _number(value), _number(of)
    if n is None or not total:
        return 0.0
    return max(0.0, min(100.0, 100.0 * n / total))


def clock(timestamp: Any) -> str:
    t = _number(timestamp)
    if t is None:
        return DASH
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def dash(value: Any) -> Any:
    return DASH if value is None or value == "" or isinstance(value, ChainableUndefined) else value


env.filters.update(
    duration=duration,
    since=since,
    until=until,
    bytes=size_bytes,
    mib=size_mib,
    percent=percent,
    share=share,
    clock=clock,
    dash=dash,
)


def context(request: Request) -> dict[str, Any]:
    """What every template may use: the page's path (the nav marks it), the operator, whether
    they may act (operator or admin: a viewer's pages have no action buttons), the CSRF token."""
    session: Session | None = getattr(request.state, "console_session", None)
    flashes: list[tuple[str, str]] = []
    if session is not None:
        flashes, session.flashes = session.flashes, []
    return {
        "request": request,
        "path": request.url.path,
        "session": session,
        "operator": session.operator if session else None,
        "role": session.role if session else None,
        "can_act": bool(session and session.may("operator")),
        "csrf": session.csrf if session else "",
        "flashes": flashes,
        "now": time.time(),
    }


def render(request: Request, template: str, /, *, status: int = 200, **ctx: Any) -> HTMLResponse:
    """The template as the answer (pages and fragments alike); `ctx` may use any name but
    `status` (the HTTP status)."""
    html = env.get_template(template).render({**context(request), **ctx})
    return HTMLResponse(html, status_code=status)


def render_fragment(request: Request, template: str, /, **ctx: Any) -> HTMLResponse:
    """A fragment the page's script swaps in: flash messages stay for the next whole page."""
    session: Session | None = getattr(request.state, "console_session", None)
    kept = list(session.flashes) if session else []
    try:
        return render(request, template, **ctx)
    finally:
        if session is not None:
            session.flashes = kept + session.flashes
