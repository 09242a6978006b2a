"""Forwarding to the backends: one shared httpx client, the local backend first, then the
upstream fallback when the operator allows it."""

from __future__ import annotations

import asyncio
import json
import os
import time
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
        self.served_model = settings.served_model_name
        self.upstream_context = settings.upstream_max_model_len
        self._context = settings.max_model_len  # the local model's; None: ask the backend
        self._context_fixed = settings.max_model_len is not None
        self._context_until = 0.0  # monotonic time the cached value is good until
        self._context_lock = asyncio.Lock()
        self.local_base = settings.backend_url.rstrip("/")
        local_key = os.environ.get(settings.backend_api_key_env or "", "").strip()
        self.local_headers = {"authorization": f"Bearer {local_key}"} if local_key else {}
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

    async def context_length(self, route: Route) -> int | None:
        """The model's context in tokens; for the local one, what the backend reports on GET
        /v1/models (max_model_len, as vLLM and the embedded server do), cached for a minute (a
        new plan may change it), retried after 5 s when the backend does not say. None:
        unknown."""
        if route.target != "local":
            return self.upstream_context
        if self._context_fixed or time.monotonic() < self._context_until:
            return self._context
        async with self._context_lock:  # one lookup for a burst of requests
            if time.monotonic() < self._context_until:
                return self._context
            value, ttl = await self._ask_context(), 60.0
            if value is None:
                ttl = 5.0  # keep the last known value meanwhile
            else:
                self._context = value
            self._context_until = time.monotonic() + ttl
        return self._context

    async def _ask_context(self) -> int | None:
        try:
            r = await self.client.get(
                f"{self.local_base}/v1/models", headers=self.local_headers, timeout=2.0
            )
            cards = r.json()["data"] if r.status_code == 200 else []
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None
        for card in cards if isinstance(cards, list) else []:
            if not isinstance(card, dict) or card.get("id") != self.served_model:
                continue
            value = card.get("max_model_len")
            if isinstance(value, int) and value > 0:
                return value
        return None

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
            url = f"{self.local_base}{path}"
            headers = {"content-type": "application/json", **self.local_headers}
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
