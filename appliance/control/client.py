"""The CLI's typed client of the control plane's API (over its unix socket).

Errors come back as the ApplianceError they were raised as (by the `type` in the JSON body), so
the CLI's exit codes are the same whether a command acted itself or through the API. No socket,
or nothing listening on it: ControlPlaneDown (exit 7, hint `appliance up`).
"""

from __future__ import annotations

from typing import Any

import httpx

from appliance import errors as e
from appliance.config import ApplianceConfig
from appliance.control.plane import socket_path

# The reverse of api/errors.py's table; 401/403 are AuthError.
_ERRORS: dict[str, type[e.ApplianceError]] = {
    "config_error": e.ConfigError,
    "state_error": e.StateError,
    "not_found": e.NotFoundError,
    "preflight_failed": e.PreflightError,
    "backend_unavailable": e.BackendError,
    "conflict": e.ConflictError,
    "unauthorized": e.AuthError,
    "forbidden": e.AuthError,
}

DEFAULT_TIMEOUT_S = 60.0


class ControlClient:
    def __init__(self, config: ApplianceConfig, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.socket = socket_path(config)
        self._http = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)),
            base_url="http://control/api/v1",
            timeout=timeout,
        )

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One call; the decoded JSON body, or the ApplianceError it answered with."""
        try:
            response = self._http.request(method, path, **kwargs)
        except (httpx.ConnectError, FileNotFoundError) as exc:
            raise e.ControlPlaneDown(
                f"the control plane is not running (nothing answers on {self.socket})"
            ) from exc
        if response.is_success:
            return response.json() if response.content else None
        raise _error(response)

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> Any:
        return self.request("POST", path, json=body, **kwargs)

    def put(self, path: str, body: Any = None, **kwargs: Any) -> Any:
        return self.request("PUT", path, json=body, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Any:
        return self.request("DELETE", path, **kwargs)

    # -- typed calls (one per endpoint; commands use these, not paths) -------------------------

    def status(self) -> dict[str, Any]:
        return self.get("/status")


def _error(response: httpx.Response) -> e.ApplianceError:
    try:
        body = response.json()["error"]
        message, type_, hint = str(body["message"]), str(body["type"]), body.get("hint")
    except (ValueError, KeyError, TypeError):
        message, type_, hint = f"HTTP {response.status_code}: {response.text[:200]}", "", None
    cls = _ERRORS.get(type_, e.ApplianceError)
    return cls(message, hint) if hint else cls(message)
