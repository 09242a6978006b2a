"""Routing: which backend serves a requested model name, under which name it knows it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from inference.gateway.settings import GatewaySettings

Target = Literal["local", "upstream"]


@dataclass(frozen=True)
class Route:
    target: Target
    model: str  # the name the backend serves; what the forwarded body carries


class Router:
    def __init__(self, settings: GatewaySettings) -> None:
        self._settings = settings
        self._upstream_models = set(settings.upstream.models) if settings.upstream else set()

    def resolve(self, requested: str) -> Route | None:
        """None for an unknown model (the gateway answers 404)."""
        model = self._settings.aliases.get(requested, requested)
        if model == self._settings.served_model_name:
            return Route("local", model)
        if model in self._upstream_models:
            return Route("upstream", model)
        return None

    def fallback(self, route: Route) -> Route | None:
        """Where a local request goes while the local backend is down, if config allows."""
        up = self._settings.upstream
        if route.target != "local" or up is None or not up.fallback:
            return None
        return Route("upstream", up.effective_fallback_model)

    def model_list(self) -> list[dict[str, object]]:
        s = self._settings
        data: list[dict[str, object]] = [
            {
                "id": s.served_model_name,
                "object": "model",
                "owned_by": "appliance",
                "root": s.served_model_name,
            },
        ]
        for alias, target in sorted(s.aliases.items()):
            data.append({"id": alias, "object": "model", "owned_by": "appliance", "root": target})
        for model in sorted(self._upstream_models):
            data.append({"id": model, "object": "model", "owned_by": "upstream", "root": model})
        return data
