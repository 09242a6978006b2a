"""inference.local: the OpenAI-compatible gateway in front of the local backend (and an upstream).

Per /v1 request: authenticate the key -> validate the body -> route the model -> check the key
may use it -> refuse a prompt that cannot fit the context -> admit it with a reservation against
the key's budget (admission.py: its ledger row, `open`) -> forward with one shared httpx client
(streams pass through event by event) -> settle the row with the real usage (off the event
loop) and the metrics.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
from fastapi import FastAPI, Request
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from inference.gateway.admission import Admission, Ticket, check_context
from inference.gateway.body import read_json_body
from inference.gateway.collectors import TelemetrySource
from inference.gateway.errors import GatewayError, error_body
from inference.gateway.forward import Forwarder
from inference.gateway.metrics import GatewayMetrics
from inference.gateway.openapi_errors import declare_errors
from inference.gateway.relay import STATUS_CLIENT_GONE, MeteredStream, Relay, plain_response
from inference.gateway.routing import Route, Router
from inference.gateway.schemas import ChatRequest, CompletionRequest
from inference.gateway.settings import GatewaySettings
from inference.gateway.template_fields import check_template_fields
from inference.notices import NOTICE_HEADER
from inference.ports import (
    AuditSink,
    BudgetStore,
    ControlPlaneHooks,
    KeyRecord,
    KeyStore,
    Ledger,
)

log = logging.getLogger(__name__)

WARNING_HEADER = "x-appliance-budget-warning"
ROUTE_HEADER = "x-appliance-route"  # "local" or "upstream": which backend answered
REQUEST_ID_HEADER = "x-appliance-request-id"  # the request's ledger row
METRICS_SCOPE = "metrics"
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


class Gateway:
    """Everything a request needs, built once per app."""

    def __init__(
        self,
        settings: GatewaySettings,
        keys: KeyStore,
        ledger: Ledger,
        budgets: BudgetStore,
        audit: AuditSink,
        hooks: ControlPlaneHooks | None,
        telemetry: TelemetrySource | None = None,
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.router = Router(settings)
        self.metrics = GatewayMetrics(keys, telemetry)
        self.admission = Admission(settings, ledger, budgets, audit, hooks, self.metrics)
        self.forward = Forwarder(settings, self.router, self.metrics)

    async def close(self) -> None:
        await self.forward.close()
        await self.admission.close()  # drains the ledger writer: a clean stop loses no rows

    # -- auth, body --------------------------------------------------------------------

    def authenticate(self, request: Request) -> KeyRecord:
        header = request.headers.get("authorization", "")
        scheme, _, secret = header.partition(" ")
        if not header:
            raise GatewayError(
                401, "missing API key: send `Authorization: Bearer <key>`", "invalid_api_key"
            )
        if scheme.lower() != "bearer" or not secret.strip():
            raise GatewayError(401, "malformed Authorization header", "invalid_api_key")
        key = self.keys.authenticate(secret.strip())
        if key is None:
            raise GatewayError(401, "invalid or revoked API key", "invalid_api_key")
        return key

    async def read_body(self, request: Request, schema: type[BaseModel]) -> dict[str, Any]:
        return await read_json_body(request, schema, self.settings.limits.max_body_bytes)

    # -- the key's model allowlist ---------------------------------------------------------

    def allowed_routes(self, key: KeyRecord) -> frozenset[Route] | None:
        """Where the key's allowed names lead now (None: anywhere). Compared as resolved routes,
        not as names: `default` and `nemotron` are the same model, and an alias the key was not
        given that leads elsewhere is refused however it is spelled. The check is on the route
        the request names, before any fallback (which is the operator's config, not the key's
        choice)."""
        if key.allowed_models is None:
            return None
        routes = (self.router.resolve(name) for name in key.allowed_models)
        return frozenset(r for r in routes if r is not None)

    def model_allowed(self, key: KeyRecord, route: Route | None) -> bool:
        return _permits(self.allowed_routes(key), route)

    async def refuse_model(
        self, key: KeyRecord, path: str, requested: str, route: Route | None
    ) -> GatewayError:
        """403 for a model the key may not use, audited (off the event loop: a refused agent
        may retry in a loop). An unknown name is refused the same way, so a restricted key
        cannot probe which models exist."""
        served = route.model if route else None
        await anyio.to_thread.run_sync(
            lambda: self.admission.audit(
                "model.deny", key, model=requested, served=served, path=path
            )
        )
        return GatewayError(
            403,
            f"the model `{requested}` is not allowed for this key; see GET /v1/models",
            "model_not_allowed",
            "model",
        )


def _permits(allowed: frozenset[Route] | None, route: Route | None) -> bool:
    return allowed is None or (route is not None and route in allowed)


def create_app(
    settings: GatewaySettings,
    keys: KeyStore,
    ledger: Ledger,
    budgets: BudgetStore,
    audit: AuditSink,
    hooks: ControlPlaneHooks | None = None,
    telemetry: TelemetrySource | None = None,
) -> FastAPI:
    """`telemetry`: where /metrics reads the GPUs (None: this host, through NVML)."""
    gw = Gateway(settings, keys, ledger, budgets, audit, hooks, telemetry)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await gw.close()  # drains the ledger writer: a clean stop loses no rows

    app = FastAPI(
        title="inference.local",
        description="OpenAI-compatible gateway of the appliance",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.gateway = gw
    declare_errors(app)  # every operation's error answers in the OpenAPI document

    @app.exception_handler(GatewayError)
    async def _gateway_error(_request: Request, exc: GatewayError) -> Response:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = "no such route; see /v1/models, /v1/chat/completions, /v1/completions"
        return GatewayError(exc.status_code, message, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _internal(_request: Request, exc: Exception) -> Response:
        # The detail goes to the log only: an exception may name paths or a store's internals.
        request_id = "req_" + secrets.token_hex(12)
        log.error("gateway bug in request %s", request_id, exc_info=exc)
        message = f"internal gateway error (request {request_id}; the gateway log has the detail)"
        headers = {REQUEST_ID_HEADER: request_id}
        return JSONResponse(error_body(message, "server_error"), 500, headers=headers)

    async def proxy(request: Request, path: str, schema: type[BaseModel]) -> Response:
        started = time.perf_counter()
        key = gw.authenticate(request)
        gw.metrics.in_flight.inc()  # refuse() or settle() takes it off again, once per request
        model = "-"
        try:
            body = await gw.read_body(request, schema)
            check_template_fields(body)  # a caller's template would break the prompt's bound
            route = gw.router.resolve(body["model"])
            if route is not None:
                model = route.model  # metered under the served name, like a budget refusal
            if not gw.model_allowed(key, route):
                raise await gw.refuse_model(key, path, body["model"], route)
            if route is None:
                raise GatewayError(
                    404,
                    f"the model `{body['model']}` does not exist; see GET /v1/models",
                    "model_not_found",
                    "model",
                )
            ticket = await admit(key, path, route, body, started)
        except GatewayError as exc:
            gw.metrics.errors.labels(path, exc.type).inc()
            gw.admission.refuse(key, path, model, exc.status, started)
            raise
        stream = ticket.stream
        wants_usage = False
        if stream:
            options = body.get("stream_options") or {}
            wants_usage = options.get("include_usage") is True
            # Always ask for usage: it is what the ledger meters.
            body["stream_options"] = {**options, "include_usage": True}
        try:
            route, response = await gw.forward.open_backend(route, path, body)
        except GatewayError as exc:
            gw.metrics.errors.labels(path, exc.type).inc()
            gw.admission.settle(ticket, exc.status, "error")  # releases the reservation
            raise
        except BaseException:  # cancelled (the client left) or a bug: release it too
            gw.admission.settle(ticket, STATUS_CLIENT_GONE, "cancelled")
            raise
        ticket.model = route.model  # the fallback's, if it answered
        headers = {ROUTE_HEADER: route.target, REQUEST_ID_HEADER: ticket.request_id}
        if ticket.warning:
            headers[WARNING_HEADER] = ticket.warning
        if route.target == "local" and (notice := response.headers.get(NOTICE_HEADER)):
            headers[NOTICE_HEADER] = notice  # our own backend's (an upstream's is not ours)
        if not stream or response.status_code != 200:
            return await plain_response(gw.admission, ticket, response, headers)
        return MeteredStream(Relay(gw.admission, ticket, response, wants_usage), headers)

    async def admit(
        key: KeyRecord, path: str, route: Route, body: dict[str, Any], started: float
    ) -> Ticket:
        """Refuse what cannot fit the context, then reserve against the budget. A request the
        fallback may serve is reserved for both routes (the larger context, the dearer price);
        the max_tokens sent is bounded by the routed model's context."""
        context = reserve = await gw.forward.context_length(route)
        check_context(body, context)
        fallback = gw.router.fallback(route)
        models = [route.model]
        if fallback is not None:
            models.append(fallback.model)
            other = await gw.forward.context_length(fallback)
            reserve = None if context is None or other is None else max(context, other)
        only_local = route.target == "local" and fallback is None
        return await gw.admission.admit(
            key, path, models, body, context, reserve, only_local, started
        )

    @app.post(CHAT, openapi_extra=_body_doc(ChatRequest), summary="Chat completion")
    async def chat_completions(request: Request) -> Response:
        return await proxy(request, CHAT, ChatRequest)

    @app.post(COMPLETIONS, openapi_extra=_body_doc(CompletionRequest), summary="Completion")
    async def completions(request: Request) -> Response:
        return await proxy(request, COMPLETIONS, CompletionRequest)

    @app.get("/v1/models", summary="Models this key may use (aliases and upstream included)")
    async def models(request: Request) -> Response:
        key = gw.authenticate(request)
        allowed = gw.allowed_routes(key)
        listed = gw.router.model_list()
        data = [m for m in listed if _permits(allowed, gw.router.resolve(str(m["id"])))]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/health/live", summary="The gateway process answers")
    async def live() -> Response:
        return JSONResponse({"status": "live"})

    @app.get("/health/ready", summary="The local backend answers its /health")
    async def ready() -> Response:
        try:
            r = await gw.forward.client.get(f"{gw.forward.local_base}/health", timeout=2.0)
            up = r.status_code == 200
            detail = f"backend /health answered {r.status_code}"
        except httpx.HTTPError as exc:
            up, detail = False, f"backend unreachable: {type(exc).__name__}"
        gw.metrics.backend_up.labels("local").set(1 if up else 0)
        body = {"status": "ready" if up else "not ready", "backend": detail}
        return JSONResponse(body, 200 if up else 503)

    @app.get("/metrics", summary="Prometheus metrics (a key with the `metrics` scope)")
    async def metrics(request: Request) -> Response:
        # Not for every key: a sandbox's key reaches the gateway. Keys are labelled by id.
        key = gw.authenticate(request)
        if METRICS_SCOPE not in key.scopes:
            raise GatewayError(
                403,
                "this key may not read metrics: that needs a key with the `metrics` scope "
                "(`appliance keys create NAME --scope metrics`)",
                "insufficient_scope",
            )
        # Off the event loop: a scrape may read NVML and the key store.
        body = await anyio.to_thread.run_sync(gw.metrics.render)
        return Response(body, media_type=gw.metrics.content_type)

    return app


def _body_doc(schema: type[BaseModel]) -> dict[str, Any]:
    """Document the request body in the OpenAPI schema (the handler validates it itself)."""
    raw = schema.model_json_schema()
    defs = raw.pop("$defs", {})

    def inline(node: Any) -> Any:  # OpenAPI has no $defs: resolve the (non-recursive) refs
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": inline(raw)}},
        }
    }
