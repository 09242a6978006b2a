"""/api/v1/notify: the webhooks notifications go to (viewer) and a test delivery (operator)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from appliance.control.api.deps import Operator, Plane, Principal, Viewer
from appliance.control.plane import ControlPlane

router = APIRouter(tags=["notify"])


@router.get("/notify")
def list_webhooks(who: Principal = Viewer, plane: ControlPlane = Plane) -> list[dict[str, Any]]:
    """Each webhook without its secret (and a URL's path, often one), with its last outcome."""
    return plane.notify.list()


# Sync: the one attempt waits for the receiver (up to the hook's timeout_s) on a worker thread.
@router.post("/notify/{name}/test")
def test_webhook(
    name: str, who: Principal = Operator, plane: ControlPlane = Plane
) -> dict[str, Any]:
    """Send a `test` event to the webhook now, once; the outcome (also in the audit log)."""
    return plane.notify.test(who, name)
