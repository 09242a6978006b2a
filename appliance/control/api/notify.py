"""/api/v1/notify: the webhooks notifications go to (viewer) and a test delivery (operator)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from appliance.control.api import lanes
from appliance.control.api.deps import Operator, Plane, Principal, Viewer
from appliance.control.plane import ControlPlane

router = APIRouter(tags=["notify"])

# A test waits for the receiver (up to the hook's timeout_s, at most 120 s): on a lane of its
# own, a few at once and the rest refused (429), never in the shared pool's way (api/lanes.py).
TESTS = lanes.Lane("webhook tests", 2, refuse_when_full=True)


@router.get("/notify")
def list_webhooks(who: Principal = Viewer, plane: ControlPlane = Plane) -> list[dict[str, Any]]:
    """Each webhook without its secret (and a URL's path, often one), with its last outcome."""
    return plane.notify.list()


@router.post("/notify/{name}/test")
async def test_webhook(
    name: str, who: Principal = Operator, plane: ControlPlane = Plane
) -> dict[str, Any]:
    """Send a `test` event to the webhook now, once; the outcome (also in the audit log)."""
    return await TESTS.run(lambda: plane.notify.test(who, name))
