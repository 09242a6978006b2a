"""The operator's web console: server-rendered pages on the control plane's own port, at `/`.

A client of the same services the /api/v1 routers call (never a second path to state); each action
carries Principal(kind="console", name=<operator>) and is audited with the operator's name.
`install(app, plane)` mounts it on the control plane's FastAPI app (control/api/create_app).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

    from appliance.control.plane import ControlPlane


def install(app: FastAPI, plane: ControlPlane) -> None:
    from appliance.console.app import install as install_console

    install_console(app, plane)
