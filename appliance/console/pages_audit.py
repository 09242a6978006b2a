"""GET /audit: the audit log's last records through filters (event prefix, actor, sandbox, text;
how many), newest first, with the chain's verification and its head hash. Reading and verifying
run on worker threads (a long log takes a while to verify; the result is kept while the log is
unchanged, audit_data.VerifyCache). A bad filter is said on the page (422), never a traceback."""

from __future__ import annotations

import json
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import Response

from appliance.audit import audit_path
from appliance.console import audit_data
from appliance.console.render import render
from appliance.console.sessions import PageViewer
from appliance.control.api.deps import Principal

router = APIRouter(include_in_schema=False)

SHOWN_APART = ("seq", "ts", "event", "actor", "actor_kind", "sandbox", "prev", "hash")
DETAIL_MAX = 600  # characters of a record's other fields shown in its row
_verified = audit_data.VerifyCache()


def details(record: dict[str, Any]) -> str:
    """A record's other fields as compact JSON, cut at DETAIL_MAX characters."""
    rest = {k: v for k, v in record.items() if k not in SHOWN_APART}
    text = json.dumps(rest, ensure_ascii=False, sort_keys=True, separators=(", ", ": "))
    return text if len(text) <= DETAIL_MAX else text[: DETAIL_MAX - 1] + "…"


@router.get("/audit")
async def audit_page(request: Request, who: Principal = PageViewer) -> Response:
    wanted, errors = audit_data.parse_filter(request.query_params)
    path = audit_path(request.app.state.plane.config.state_dir)
    records = await anyio.to_thread.run_sync(audit_data.tail, path, wanted)
    verification = await anyio.to_thread.run_sync(_verified.verification, path)
    head = verification.get("head") or {}
    return render(
        request,
        "audit.html",
        status=422 if errors else 200,
        wanted=wanted,
        errors=errors,
        records=[(r, details(r)) for r in records],
        verification=verification,
        head_hash=head.get("hash") or verification.get("last_hash"),
        limit_max=audit_data.LIMIT_MAX,
        filter_max=audit_data.FILTER_MAX,
    )
