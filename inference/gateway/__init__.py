"""inference.local: the OpenAI-compatible gateway (auth, metering, budgets, routing, metrics).

`create_app` is imported lazily: reading the settings (every CLI call does) must not pay for
importing FastAPI.
"""

from typing import Any

from inference.gateway.settings import GatewaySettings, Price, UpstreamSettings

__all__ = ["GatewaySettings", "Price", "UpstreamSettings", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from inference.gateway.app import create_app

        return create_app
    raise AttributeError(name)
