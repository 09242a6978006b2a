"""The control plane's HTTP API, /api/v1/...: thin routers (one module per concern) over the
plane's services; auth is a dependency (deps.py), errors one JSON shape (errors.py)."""

from __future__ import annotations

from fastapi import FastAPI

from appliance import __version__, console
from appliance.control.api import (
    agents,
    approvals,
    audit,
    budgets,
    errors,
    keys,
    kill,
    notify,
    operators,
    sandboxes,
    schedules,
    spend,
    status,
)
from appliance.control.api.audit_trail import AuditTrail
from appliance.control.api.host_check import LoopbackHostOnly
from appliance.control.plane import ControlPlane

PREFIX = "/api/v1"
# Every router module exposes `router`; a new concern adds its module here.
ROUTERS = [status, sandboxes, approvals, kill]
ROUTERS += [operators, keys, budgets, audit]  # control-core
ROUTERS += [agents]  # control-agents
ROUTERS += [schedules]  # control-schedules
ROUTERS += [notify]  # notifications (appliance/control/notify/)
ROUTERS += [spend]  # the console's Spend page's data (appliance/ops/spend.py)


def create_app(plane: ControlPlane) -> FastAPI:
    app = FastAPI(
        title="appliance control plane",
        version=__version__,
        openapi_url=f"{PREFIX}/openapi.json",
        docs_url=None,
        redoc_url=None,
    )
    app.state.plane = plane
    errors.install(app)
    console.install(app, plane)  # the web console at / (appliance/console/): same services
    # Every mutation and every refusal goes to the hash-chained audit log, with who.
    app.add_middleware(AuditTrail, sink=plane.audit_log)
    # Outermost (added last): a Host that is not a loopback name is refused before auth and audit.
    app.add_middleware(LoopbackHostOnly, also=[plane.config.control.host])
    for module in ROUTERS:
        app.include_router(module.router, prefix=PREFIX)
    return app
