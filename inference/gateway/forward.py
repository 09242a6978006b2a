"""Forwarding to the backends: one shared httpx client, the local backend first, then the
upstream fallback when the operator allows it."""

from __future__ import annotations

import json
from typing import Any

import httpx

from inference.gateway.errors import GatewayError
from inference.gateway.metrics import GatewayMetrics
from inference.gateway.routing import Route, Router
from inference.gateway.settings import GatewaySettings


class _BackendDown(Exception):
    pass


class Forwarder:
    def __init__(self, settings: GatewaySettings, router: Router, metrics: GatewayMetrics) -> None:
        self.router = router
        self.metrics = metrics
        self.local_base = settings.backend_url.rstrip("/")
        self.upstream_base = settings.upstream.base_url.rstrip("/") if settings.upstream else ""
        key = settings.upstream.api_key() if settings.upstream else None
        self.upstream_headers = {"authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(
                connect=settings.connect_timeout_s,
                read=settings.request_timeout_s,
                write=60.0,
                pool=60.0,
            ),
            limits=httpx.Limits(
                max_connections=settings.max_backend_connections,
                max_keepalive_connections=settings.max_backend_connections,
            ),
        )

    async def close(self) -> None:
        await self.client.aclose()

    async def open_backend(
        self, route: Route, path: str, body: dict[str, Any]
    ) -> tuple[Route, httpx.Response]:
        """Send the request; a local backend that is down falls back to the upstream if allowed."""
        try:
            return route, await self._send(route, path, body)
        except _BackendDown:
            self.metrics.backend_up.labels(route.target).set(0)
            fallback = self.router.fallback(route)
            if fallback is None:
                raise GatewayError(
                    503,
                    f"the {route.target} inference backend is down; try again shortly",
                    "backend_unavailable",
                ) from None
        try:
            return fallback, await self._send(fallback, path, body)
        except _BackendDown:
            self.metrics.backend_up.labels("upstream").set(0)
            raise GatewayError(
                503,
                "the local backend is down and the fallback upstream is unreachable",
                "backend_unavailable",
            ) from None

    async def _send(self, route: Route, path: str, body: dict[str, Any]) -> httpx.Response:
        out = dict(body, model=route.model)
        if route.target == "local":
            url, headers = f"{self.local_base}{path}", {"content-type": "application/json"}
        else:
            url = f"{self.upstream_base}{path.removeprefix('/v1')}"
            headers = {"content-type": "application/json", **self.upstream_headers}
        request = self.client.build_request(
            "POST", url, content=json.dumps(out).encode(), headers=headers
        )
        try:
            response = await self.client.send(request, stream=True)
        except httpx.TimeoutException:
            raise GatewayError(504, "the inference backend timed out", "backend_timeout") from None
        except httpx.TransportError:  # refused, reset, died before answering
            raise _BackendDown() from None
        if response.status_code == 503 and route.target == "local":
            await response.aclose()  # vLLM answers 503 while its engine is dead
            raise _BackendDown()
        self.metrics.backend_up.labels(route.target).set(1)
        return response
