"""The embedded backend's HTTP server: vLLM's OpenAI-compatible routes over the Engine.

The gateway treats every backend as a vLLM server, so this speaks the same contract: /v1/models,
/v1/chat/completions, /v1/completions (SSE streams ending in `data: [DONE]`), /health, /version,
/metrics (vLLM's metric names), /tokenize, /detokenize; errors in OpenAI's JSON shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from inference.embedded.engine import Engine
from inference.embedded.errors import EngineError, InvalidRequest
from inference.embedded.metrics import VllmMetrics
from inference.embedded.prompts import PromptReader
from inference.embedded.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from inference.embedded.request import Output, RequestHandle
from inference.embedded.sampling import SamplingParams
from inference.embedded.tool_slot import ToolSlot
from inference.notices import NOTICE_HEADER

log = logging.getLogger("inference.embedded")

VERSION = "0.1.0"
_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 503: "ServiceUnavailableError"}


def _error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    default = "InternalServerError" if status >= 500 else "BadRequestError"
    err_type = _ERROR_TYPES.get(status, default)
    return {"message": message, "type": err_type, "param": param, "code": status}


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return JSONResponse({"error": _error_body(status, message, param)}, status_code=status)


class ModelNotServed(Exception):
    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist.")


class ClientGone(Exception):
    """The client disconnected before a non-streaming answer was ready."""


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


def _sse(obj: dict[str, Any] | str) -> str:
    data = (
        obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    )
    return f"data: {data}\n\n"


async def _merge(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, Output]]:
    """(choice index, output) from several requests as they come; one request needs no tasks."""
    if len(handles) == 1:
        async for out in handles[0]:
            yield 0, out
        return
    merged: asyncio.Queue[tuple[int, Output] | None] = asyncio.Queue()

    async def pump(i: int, h: RequestHandle) -> None:
        async for out in h:
            await merged.put((i, out))
        await merged.put(None)

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await merged.get()
            if item is None:
                remaining -= 1
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _Choice:
    def __init__(self) -> None:
        self.text: list[str] = []
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.error: str | None = None


def create_app(engine: Engine, served_model_name: str) -> FastAPI:
    """The FastAPI app for a loaded, started `engine`, answering to `served_model_name`."""
    app = FastAPI(
        title="appliance embedded backend", version=VERSION, docs_url=None, redoc_url=None
    )
    metrics = VllmMetrics(engine, served_model_name)
    # Prompts are tokenized on worker threads, never here: /health must answer during a 24 MB one.
    prompts = PromptReader(engine)
    tool_slot = ToolSlot(engine.model_root, engine.tokenizer)  # asked once per loaded model
    created = int(time.time())
    app.state.engine = engine
    app.state.metrics = metrics

    # -- errors, in OpenAI's shape -------------------------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def _bad_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(EngineError)
    async def _engine(_: Request, exc: EngineError) -> JSONResponse:
        return error_response(exc.status, str(exc))

    @app.exception_handler(ModelNotServed)
    async def _model(_: Request, exc: ModelNotServed) -> JSONResponse:
        return error_response(404, str(exc), param="model")

    @app.exception_handler(ClientGone)
    async def _gone(_: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    def check_model(model: str | None) -> None:
        if model is not None and model != served_model_name:
            raise ModelNotServed(model)

    # -- plain routes --------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        if not engine.alive:
            return error_response(503, "the generation worker is not running")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": VERSION, "backend": "embedded", "model": engine.model_root}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": served_model_name,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": engine.model_root,
            "parent": None,
            "max_model_len": engine.max_model_len,
            "permission": [],
            # What the control plane asks (appliance/control/notices.py): vLLM has no such field.
            "appliance": {"tools": tool_slot.slot, "demonstration": engine.demonstration},
        }
        return {"object": "list", "data": [card]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        check_model(body.model)
        ids = await asyncio.to_thread(prompts.tokenize, body)
        return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        check_model(body.model)
        prompts.check_ids(body.tokens)
        return {"prompt": await asyncio.to_thread(engine.decode, body.tokens, False)}

    # -- generation ------------------------------------------------------------------------------
    def submit_all(prompts: list[list[int]], params: SamplingParams, n: int) -> list[RequestHandle]:
        """One engine request per (prompt, sample); all or none are queued."""
        loop = asyncio.get_running_loop()
        handles: list[RequestHandle] = []
        try:
            for ids in prompts:
                for j in range(n):
                    p = SamplingParams(**vars(params))
                    p.stop, p.stop_token_ids = list(params.stop), list(params.stop_token_ids)
                    if p.seed is not None and j:
                        p.seed += j  # n samples with one seed: distinct, yet reproducible
                    handles.append(engine.submit(ids, p, loop=loop))
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        return handles

    async def gather(handles: list[RequestHandle], request: Request) -> list[_Choice]:
        choices = [_Choice() for _ in handles]

        async def collect() -> None:
            async for i, out in _merge(handles):
                c = choices[i]
                c.text.append(out.text)
                c.completion_tokens = out.completion_tokens
                c.cached_tokens = out.cached_tokens
                if out.finish_reason is not None:
                    c.finish_reason, c.stop_reason, c.error = (
                        out.finish_reason,
                        out.stop_reason,
                        out.error,
                    )

        # Like vLLM's with_cancellation: a client that hangs up cancels its generation.
        work = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
                for h in handles:
                    h.cancel()
        if not work.done() or work.cancelled():
            raise ClientGone
        work.result()
        failed = next((c for c in choices if c.finish_reason == "error"), None)
        if failed is not None:
            raise EngineError(failed.error or "generation failed")  # a 500
        return choices

    def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
        # prompt_tokens_details as OpenAI (and vLLM with --enable-prompt-tokens-details) fill it.
        return {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens},
        }

    async def stream(
        handles: list[RequestHandle],
        prompt_tokens: int,
        include_usage: bool,
        continuous_usage: bool,
        head: dict[str, Any],
        chat: bool,
        first_texts: list[str] | None = None,
    ) -> AsyncIterator[str]:
        completion = [0] * len(handles)
        cached = [0] * len(handles)

        def chunk(i: int, text: str | None, finish: str | None, stop: Any, role: bool = False):
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
                if text:
                    delta["content"] = text
                choice: dict[str, Any] = {"index": i, "delta": delta, "logprobs": None}
            else:
                choice = {"index": i, "text": text or "", "logprobs": None}
            choice["finish_reason"] = finish
            if finish is not None or not chat:
                choice["stop_reason"] = stop
            body = {**head, "choices": [choice]}
            if include_usage:
                body["usage"] = (
                    usage(prompt_tokens, sum(completion), sum(cached)) if continuous_usage else None
                )
            return _sse(body)

        try:
            if chat:
                for i in range(len(handles)):
                    yield chunk(i, None, None, None, role=True)
            elif first_texts:
                for i, text in enumerate(first_texts):
                    if text:
                        yield chunk(i, text, None, None)  # echo
            async for i, out in _merge(handles):
                completion[i] = out.completion_tokens
                cached[i] = out.cached_tokens
                if out.finish_reason == "error":
                    message = out.error or "generation failed"
                    yield _sse({"error": _error_body(500, message)})
                    continue
                if out.text or out.finish_reason is not None:
                    yield chunk(i, out.text, out.finish_reason, out.stop_reason)
            if include_usage:
                final = usage(prompt_tokens, sum(completion), sum(cached))
                yield _sse({**head, "choices": [], "usage": final})
            yield _sse("[DONE]")
        finally:  # also on client disconnect (the task is cancelled): stop generating
            for h in handles:
                h.cancel()

    async def respond(
        body: ChatCompletionRequest | CompletionRequest,
        request: Request,
        handles: list[RequestHandle],
        head: dict[str, Any],
        prompt_tokens: int,
        fields: Callable[[_Choice, int], dict[str, Any]],
        *,
        chat: bool,
        first_texts: list[str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """The SSE stream, or the whole response: `fields` makes the endpoint's own part of a
        choice (chat's message, completion's text)."""
        if body.stream:
            opts = body.stream_options
            return StreamingResponse(
                stream(
                    handles,
                    prompt_tokens,
                    bool(opts and opts.include_usage),
                    bool(opts and opts.continuous_usage_stats),
                    head,
                    chat=chat,
                    first_texts=first_texts,
                ),
                media_type="text/event-stream",
                headers=headers,
            )
        choices = await gather(handles, request)
        answer = {
            **head,
            "choices": [
                {
                    "index": i,
                    **fields(c, i),
                    "logprobs": None,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
                for i, c in enumerate(choices)
            ],
            "usage": usage(
                prompt_tokens,
                sum(c.completion_tokens for c in choices),
                sum(c.cached_tokens for c in choices),
            ),
        }
        return JSONResponse(answer, headers=headers)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        check_model(body.model)
        prompt = await asyncio.to_thread(prompts.chat, body)
        notice = tool_slot.notice_for(body.tools)
        handles = submit_all([prompt], _sampling(body, body.max_new_tokens), body.n)
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk" if body.stream else "chat.completion",
            "created": int(time.time()),
            "model": served_model_name,
        }

        def message(c: _Choice, i: int) -> dict[str, Any]:
            return {
                "message": {
                    "role": "assistant",
                    "content": "".join(c.text),
                    "refusal": None,
                    "tool_calls": [],
                    "reasoning_content": None,
                },
            }

        headers = {NOTICE_HEADER: notice} if notice else None
        return await respond(
            body, request, handles, head, len(prompt), message, chat=True, headers=headers
        )

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        check_model(body.model)
        params = _sampling(body, body.max_tokens)
        ids = await asyncio.to_thread(prompts.completion, body)
        handles = submit_all(ids, params, body.n)
        prompt_tokens = sum(len(p) for p in ids)
        echo = [engine.decode(p) if body.echo else "" for p in ids for _ in range(body.n)]
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": served_model_name,
        }

        def text(c: _Choice, i: int) -> dict[str, Any]:
            return {"text": echo[i] + "".join(c.text), "prompt_logprobs": None}

        return await respond(
            body, request, handles, head, prompt_tokens, text, chat=False, first_texts=echo
        )

    return app


def _sampling(
    body: ChatCompletionRequest | CompletionRequest, max_tokens: int | None
) -> SamplingParams:
    try:
        return body.sampling(max_tokens)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from exc


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_name: str = "model",
    model: str | None = None,
    cache_dir: str | None = None,
    **engine_kwargs: Any,
) -> None:
    """Load the model, then serve it with uvicorn (one worker) until interrupted."""
    import uvicorn

    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
    log.setLevel(logging.INFO)
    engine = Engine.load(model, cache_dir, **engine_kwargs)
    log.info(
        "embedded: loaded %s in %.1f s (%s; decode weights: %s; context %d%s; prefix cache %s)",
        engine.model_root,
        engine.load_s,
        "from the weights cache" if engine.from_cache else "converted",
        engine.weights_kind,
        engine.max_model_len,
        f", RoPE {rope}"
        if (rope := getattr(engine.runner, "rope_scaling", "none")) != "none"
        else "",
        f"{pc.max_bytes / 2**30:.1f} GiB" if (pc := engine.prefix_cache) is not None else "off",
    )
    app = create_app(engine, served_model_name)
    log.info("embedded: serving %r on http://%s:%d", served_model_name, host, port)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        with contextlib.suppress(Exception):
            engine.shutdown()
