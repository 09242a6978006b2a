"""The error a sandbox's lifecycle raises (create, start, proxy, kill switch), with the hint."""

from __future__ import annotations

from appliance.errors import ApplianceError


class SandboxError(ApplianceError):
    hint = "see `appliance sandbox logs NAME` and the proxy log in the state directory"
