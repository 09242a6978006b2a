"""inference.local: the OpenAI-compatible gateway in front of the local backend (and an upstream).

Per /v1 request: authenticate the key -> validate the body -> route the model -> check the key
may use it -> check the key's budget -> forward with one shared httpx client (streams pass
through event by event) -> meter the usage into the ledger (off the event loop) and the metrics.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
from fastapi import FastAPI, Request
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from inference import budgets as budget_math
from inference.gateway.errors import GatewayError, error_body, sse_error
from inference.gateway.metrics import GatewayMetrics
from inference.gateway.routing import Route, Router
from inference.gateway.schemas import ChatRequest, CompletionRequest, validation_error_message
from inference.gateway.settings import GatewaySettings
from inference.gateway.sse import SSEMeter
from inference.metering import UsageWriter, cost_of
from inference.ports import (
    AuditSink,
    BudgetStore,
    ControlPlaneHooks,
    KeyRecord,
    KeyStore,
    Ledger,
    Spend,
    UsageRecord,
)

log = logging.getLogger(__name__)

WARNING_HEADER = "x-appliance-budget-warning"
ROUTE_HEADER = "x-appliance-route"  # "local" or "upstream": which backend answered
MAX_BODY_BYTES = 32 * 1024 * 1024
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"

# Statuses recorded in the ledger for streams that did not end normally (the client saw 200).
STATUS_CLIENT_GONE = 499
STATUS_BACKEND_BROKE = 502


class _BackendDown(Exception):
    pass


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


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
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.ledger = ledger
        self.budgets = budgets
        self.audit = audit
        self.hooks = hooks or ControlPlaneHooks()
        self.router = Router(settings)
        self.metrics = GatewayMetrics()
        self.writer = UsageWriter(ledger)
        self.prices = settings.price_table()
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
        self._marked: set[tuple[str, str, str, str]] = set()  # budget events already stored
        self._hook_tasks: set[asyncio.Future[Any]] = set()

    async def close(self) -> None:
        await self.client.aclose()
        if self._hook_tasks:
            await asyncio.wait(self._hook_tasks, timeout=10)
        await anyio.to_thread.run_sync(self.writer.close)

    # -- auth, body, budget --------------------------------------------------------------

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
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise GatewayError(413, "request body too large", "request_too_large")
        raw = await request.body()
        if not raw:
            raise GatewayError(400, "request body is empty; expected a JSON object")
        try:
            body = json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            raise GatewayError(400, f"malformed JSON body: {exc}", "invalid_json") from None
        if not isinstance(body, dict):
            raise GatewayError(400, "request body must be a JSON object", "invalid_request")
        try:
            schema.model_validate(body)
        except ValidationError as exc:
            message, param = validation_error_message(exc)
            raise GatewayError(400, message, "invalid_request", param) from None
        return body

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
            lambda: self._audit("model.deny", key, model=requested, served=served, path=path)
        )
        return GatewayError(
            403,
            f"the model `{requested}` is not allowed for this key; see GET /v1/models",
            "model_not_allowed",
            "model",
        )

    def spend(self, key_id: str, now: float) -> Spend:
        stored = self.ledger.spend(key_id, now)
        tokens, cost = self.writer.pending(key_id)  # queued, not committed yet
        if not tokens and not cost:
            return stored
        return Spend(
            day_tokens=stored.day_tokens + tokens,
            month_tokens=stored.month_tokens + tokens,
            day_cost=stored.day_cost + cost,
            month_cost=stored.month_cost + cost,
        )

    def check_budget(self, key: KeyRecord) -> str | None:
        """Raise 429 when a limit is exhausted; return the warning header's value, if any."""
        budget = self.budgets.get_budget(key.id)
        if budget is None:
            return None
        now = time.time()
        verdict = budget_math.evaluate(
            budget, self.spend(key.id, now), now, self.settings.budget_warn_ratio
        )
        self.metrics.budget_state.labels(key.name).set(budget_math.STATE_VALUE[verdict.state])
        for use in verdict.warnings:
            if self._first(key, use, "warning"):
                self.metrics.budget_warnings.labels(key.name, use.name).inc()
                self._audit(
                    "budget.warning",
                    key,
                    budget=use.name,
                    used=use.used,
                    limit=use.limit,
                    percent=int(use.ratio * 100),
                    period=use.period(),
                )
        blocking = verdict.blocking
        if blocking is None:
            return verdict.warning_header()
        self.metrics.budget_refusals.labels(key.name, blocking.name).inc()
        level = "hard_stop" if blocking.monthly else "exceeded"
        if self._first(key, blocking, level):
            self._audit(
                f"budget.{level}",
                key,
                budget=blocking.name,
                used=blocking.used,
                limit=blocking.limit,
                period=blocking.period(),
                resets_at=budget_math.iso(blocking.resets_at),
            )
            if blocking.monthly:
                self._hard_stop(key)
        raise GatewayError(
            429,
            verdict.refusal_message(key.name),
            f"{blocking.name}_budget_exceeded",
            headers={
                "retry-after": str(verdict.retry_after_s(now)),
                "x-should-retry": "false",  # tells OpenAI SDKs not to spin on it
            },
        )

    def _first(self, key: KeyRecord, use: budget_math.BudgetUse, level: str) -> bool:
        mark = (key.id, use.name, level, use.period())
        if mark in self._marked:
            return False
        self._marked.add(mark)
        return self.budgets.mark_budget_event(*mark)

    def _audit(self, event: str, key: KeyRecord, **fields: Any) -> None:
        try:
            self.audit.audit(event, key_id=key.id, key_name=key.name, **fields)
        except Exception:  # an audit failure must not take the request path down
            log.exception("audit %s failed", event)

    def _hard_stop(self, key: KeyRecord) -> None:
        """Tell the control plane, off the request path: a hook may stop a whole sandbox."""
        loop = asyncio.get_running_loop()
        for callback in self.hooks.on_hard_stop:
            if inspect.iscoroutinefunction(callback):
                fut: asyncio.Future[Any] = asyncio.ensure_future(callback(key))
            else:
                fut = loop.run_in_executor(None, callback, key)
            self._hook_tasks.add(fut)
            fut.add_done_callback(self._hook_done)

    def _hook_done(self, fut: asyncio.Future[Any]) -> None:
        self._hook_tasks.discard(fut)
        if not fut.cancelled() and fut.exception() is not None:
            log.error("hard-stop hook failed: %r", fut.exception())

    # -- forwarding ------------------------------------------------------------------------

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

    # -- metering ------------------------------------------------------------------------

    def record(
        self,
        key: KeyRecord,
        route_path: str,
        model: str,
        status: int,
        started: float,
        stream: bool,
        prompt: int = 0,
        completion: int = 0,
    ) -> None:
        latency = time.perf_counter() - started
        cost = cost_of(self.prices, model, prompt, completion)
        self.writer.submit(
            UsageRecord(
                key_id=key.id,
                model=model,
                prompt_tokens=prompt,
                completion_tokens=completion,
                latency_s=latency,
                status=status,
                stream=stream,
                cost=cost,
                ts=time.time(),
            )
        )
        m = self.metrics
        m.in_flight.dec()
        m.requests.labels(route_path, str(status), key.name, model).inc()
        m.latency.labels(route_path, model).observe(latency)
        if prompt or completion:
            m.prompt_tokens.labels(key.name, model).inc(prompt)
            m.completion_tokens.labels(key.name, model).inc(completion)
            if cost:
                m.cost.labels(key.name, model).inc(cost)


def _permits(allowed: frozenset[Route] | None, route: Route | None) -> bool:
    return allowed is None or (route is not None and route in allowed)


def _estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """Rough count (4 characters a token) for a stream that ended before its usage chunk."""
    if "messages" in body:
        text = "".join(
            m.get("content") if isinstance(m.get("content"), str) else json.dumps(m)
            for m in body["messages"]
        )
    else:
        text = json.dumps(body.get("prompt", ""))
    return max(1, len(text) // 4)


class _MeteredStream(StreamingResponse):
    """Ends the relay explicitly, so a client that hangs up is metered at once (and one that
    hung up before the first byte is metered too)."""

    def __init__(self, relay: _Relay, headers: dict[str, str]) -> None:
        super().__init__(relay.events(), headers=headers, media_type="text/event-stream")
        self.relay = relay

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
                await self.relay.finish()


def create_app(
    settings: GatewaySettings,
    keys: KeyStore,
    ledger: Ledger,
    budgets: BudgetStore,
    audit: AuditSink,
    hooks: ControlPlaneHooks | None = None,
) -> FastAPI:
    gw = Gateway(settings, keys, ledger, budgets, audit, hooks)

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
        log.exception("gateway bug")
        return JSONResponse(error_body(f"internal gateway error: {exc}", "server_error"), 500)

    async def proxy(request: Request, path: str, schema: type[BaseModel]) -> Response:
        started = time.perf_counter()
        key = gw.authenticate(request)
        gw.metrics.in_flight.inc()  # record() takes it off again, once per request
        model = "-"
        try:
            body = await gw.read_body(request, schema)
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
            warning = gw.check_budget(key)
            stream = body.get("stream") is True
            wants_usage = False
            if stream:
                options = body.get("stream_options") or {}
                wants_usage = options.get("include_usage") is True
                # Always ask for usage: it is what the ledger meters.
                body["stream_options"] = {**options, "include_usage": True}
            route, response = await gw.open_backend(route, path, body)
            model = route.model
        except GatewayError as exc:
            gw.metrics.errors.labels(path, exc.type).inc()
            gw.record(key, path, model, exc.status, started, False)
            raise
        headers = {ROUTE_HEADER: route.target}
        if warning:
            headers[WARNING_HEADER] = warning
        if not stream or response.status_code != 200:
            return await _plain(gw, key, path, model, response, headers, started, stream)
        relay = _Relay(gw, key, path, model, response, body, wants_usage, started)
        return _MeteredStream(relay, headers)

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
            r = await gw.client.get(f"{gw.local_base}/health", timeout=2.0)
            up = r.status_code == 200
            detail = f"backend /health answered {r.status_code}"
        except httpx.HTTPError as exc:
            up, detail = False, f"backend unreachable: {type(exc).__name__}"
        gw.metrics.backend_up.labels("local").set(1 if up else 0)
        body = {"status": "ready" if up else "not ready", "backend": detail}
        return JSONResponse(body, 200 if up else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(gw.metrics.render(), media_type=gw.metrics.content_type)

    return app


async def _plain(
    gw: Gateway,
    key: KeyRecord,
    path: str,
    model: str,
    response: httpx.Response,
    headers: dict[str, str],
    started: float,
    stream: bool,
) -> Response:
    """A whole JSON answer (or a backend error, passed on with its status)."""
    try:
        content = await response.aread()
    except httpx.HTTPError:
        gw.record(key, path, model, 502, started, stream)
        raise GatewayError(502, "the backend failed while answering", "backend_error") from None
    finally:
        await response.aclose()
    status = response.status_code
    prompt = completion = 0
    if status == 200:
        try:
            usage = json.loads(content).get("usage") or {}
            prompt = int(usage.get("prompt_tokens") or 0)
            completion = int(usage.get("completion_tokens") or 0)
        except (ValueError, AttributeError, TypeError):
            pass
    else:
        gw.metrics.errors.labels(path, f"backend_{status}").inc()
        try:
            json.loads(content)["error"]  # already OpenAI-shaped: pass it on
        except (ValueError, KeyError, TypeError):
            text = content.decode(errors="replace")[:500]
            content = json.dumps(error_body(f"backend: {text}", "server_error")).encode()
    gw.record(key, path, model, status, started, stream, prompt, completion)
    media = response.headers.get("content-type", "application/json")
    return Response(content, status, headers=headers, media_type=media)


class _Relay:
    """Passes a backend stream through event by event and meters it, however it ends."""

    def __init__(
        self,
        gw: Gateway,
        key: KeyRecord,
        path: str,
        model: str,
        response: httpx.Response,
        body: dict[str, Any],
        wants_usage: bool,
        started: float,
    ) -> None:
        self.gw, self.key, self.path, self.model = gw, key, path, model
        self.response, self.body, self.started = response, body, started
        self.meter = SSEMeter(wants_usage, chat=path == CHAT)
        self.status = STATUS_CLIENT_GONE  # until the stream ends one way or the other
        self._finished = False

    async def events(self) -> AsyncIterator[bytes]:
        meter = self.meter
        try:
            async for chunk in self.response.aiter_raw():
                out = meter.feed(chunk)
                if meter.done:  # before the yield: the client may hang up as soon as it reads it
                    self.status = 200
                if out:
                    yield out
            tail = meter.tail()
            if tail:
                yield tail
            if not meter.done:  # the backend closed without [DONE]: a cut-short stream
                self.status = STATUS_BACKEND_BROKE
                yield sse_error("the inference backend closed the stream early")
        except httpx.HTTPError as exc:
            self.status = STATUS_BACKEND_BROKE
            self.gw.metrics.backend_up.labels("local").set(0)
            yield sse_error(
                f"the inference backend failed mid-stream ({type(exc).__name__}); "
                "the partial answer above was metered",
                "server_error",
                "backend_stream_error",
            )

    async def finish(self) -> None:
        """Meter the request once and release the backend connection."""
        if self._finished:
            return
        self._finished = True
        gw, meter = self.gw, self.meter
        usage = meter.usage or {}
        if usage:
            prompt = int(usage.get("prompt_tokens") or 0)
            completion = int(usage.get("completion_tokens") or 0)
        else:
            prompt = _estimate_prompt_tokens(self.body)
            completion = meter.data_events
        if self.status != 200:
            gw.metrics.errors.labels(self.path, f"stream_{self.status}").inc()
        if meter.first_token_at is not None:
            gw.metrics.ttft.labels(self.model).observe(meter.first_token_at - self.started)
        gw.record(
            self.key, self.path, self.model, self.status, self.started, True, prompt, completion
        )
        await self.response.aclose()


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
