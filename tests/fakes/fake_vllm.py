"""A stand-in for `vllm serve`: a real process that speaks vLLM's HTTP contract (REFERENCE §3).

    python -m tests.fakes.fake_vllm serve MODEL --host 127.0.0.1 --port N [any vllm flags...]

argv has vLLM's shape, so the real backend manager launches it in place of the `vllm` executable.
It reads --host, --port, --served-model-name (one or more), --max-model-len, --max-num-seqs and
--gpu-memory-utilization; any other flag (with or without a value) is accepted and ignored.
--api-key or VLLM_API_KEY guards /v1 as in vLLM. Behaviour knobs are env vars, so argv stays vLLM's:

  FAKE_VLLM_LOAD_SECONDS  model load time (default 0): the port is bound at once and /health is
                          503 until loaded; progress lines go to stderr as vLLM prints them
  FAKE_VLLM_BIND_LATE=1   bind the port only after the load, like real vLLM
  FAKE_VLLM_TOKEN_DELAY   seconds per generated token (default 0)
  FAKE_VLLM_OOM_ABOVE     --gpu-memory-utilization above this: vLLM's "Free memory on device ..."
                          error at start, exit 1 (FAKE_VLLM_OOM_KIND=cuda: a CUDA OOM instead,
                          =cache-blocks: "No available memory for the cache blocks")
  FAKE_VLLM_OOM_MAX_LEN   --max-model-len above this: vLLM's "max seq len ... larger than the
                          available KV cache memory" error (estimate = this value), exit 1
  FAKE_VLLM_DIE_AFTER     os._exit(1) after generating this many tokens of a request (mid-stream)
  FAKE_VLLM_TOKENS_PER_EVENT  tokens per stream event (default 1; vLLM may batch several)
  FAKE_VLLM_NO_USAGE=1    whole answers carry no `usage` (a backend that omits it)

SIGUSR1 marks the engine dead: /health answers 503 and /v1 calls 500, as vLLM does.
Generation is deterministic: "tok0 tok1 ..." for max_tokens (16 when unset) tokens, in each of
n choices per prompt (a completion's list of prompts: one set each), one choice after another;
prompt_tokens = whitespace words of the prompt (chat: of every text content).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import time
import uuid
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

VERSION = "0.33.0"
TOOL_TRIGGER = "call a tool"


def _size(text: str) -> int:  # vLLM accepts 32k / 1M as well as plain integers
    mult = {"k": 1000, "m": 1000**2}.get(text[-1].lower(), 1)
    return int(float(text[:-1] if mult > 1 else text) * mult)


def parse_argv(argv: list[str]) -> dict[str, Any]:
    """vLLM's argv shape: `serve MODEL --flag [value...] ...`; unknown flags are skipped."""
    args = argv[1:] if argv[:1] == ["serve"] else argv
    flags: dict[str, list[str]] = {}
    positional: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            values = [value] if eq else []
            while not eq and i + 1 < len(args) and not args[i + 1].startswith("--"):
                values.append(args[i + 1])  # a flag's values run up to the next flag
                i += 1
            flags[name.replace("_", "-")] = values  # the last occurrence wins, as in argparse
        else:
            positional.append(arg)
        i += 1

    def first(name: str, default: str) -> str:
        return (flags.get(name) or [default])[0]

    model = positional[0] if positional else first("model", "facebook/opt-125m")
    return {
        "model": model,
        "names": flags.get("served-model-name") or [model],
        "host": first("host", "127.0.0.1"),
        "port": int(first("port", "8000")),
        "max_model_len": _size(first("max-model-len", "32768")),
        "max_num_seqs": int(first("max-num-seqs", "256")),
        "util": float(first("gpu-memory-utilization", "0.92")),
        "api_key": first("api-key", "") or os.environ.get("VLLM_API_KEY"),
    }


def log(text: str) -> None:
    stamp = time.strftime("%m-%d %H:%M:%S")
    print(f"INFO {stamp} [fake_vllm] {text}", file=sys.stderr, flush=True)


def oom_message(cfg: dict[str, Any]) -> str | None:
    """The error vLLM prints at start when this configuration does not fit, if it does not."""
    above, max_len = os.environ.get("FAKE_VLLM_OOM_ABOVE"), os.environ.get("FAKE_VLLM_OOM_MAX_LEN")
    if above is not None and cfg["util"] > float(above):
        kind = os.environ.get("FAKE_VLLM_OOM_KIND", "free-memory")
        if kind == "cuda":
            return (
                "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has "
                "a total capacity of 119.70 GiB of which 1.12 GiB is free. Including non-PyTorch "
                "memory, this process has 117.80 GiB memory in use."
            )
        if kind == "cache-blocks":
            return (
                "ValueError: No available memory for the cache blocks. Try increasing "
                "`gpu_memory_utilization` when initializing the engine."
            )
        want = 119.7 * cfg["util"]
        return (
            f"ValueError: Free memory on device cuda:0 ({119.7 * float(above):.2f}/119.70 GiB) on "
            f"startup is less than desired GPU memory utilization ({cfg['util']}, {want:.2f} GiB). "
            "Decrease GPU memory utilization or reduce GPU memory used by other processes."
        )
    if max_len is not None and cfg["max_model_len"] > int(max_len):
        return (
            f"ValueError: To serve at least one request with the models's max seq len "
            f"({cfg['max_model_len']}), (4.00 GiB KV cache is needed, which is larger than the "
            f"available KV cache memory (1.00 GiB). Based on the available memory, the estimated "
            f"maximum model length is {max_len}. Try increasing `gpu_memory_utilization` or "
            "decreasing `max_model_len` when initializing the engine."
        )
    return None


def load_model(cfg: dict[str, Any], state: dict[str, Any]) -> None:
    """Sleep through the 'load' printing vLLM-like progress, then fail like vLLM or be ready."""
    seconds, shards = float(os.environ.get("FAKE_VLLM_LOAD_SECONDS", "0")), 4
    log(f"Loading model {cfg['model']} (gpu_memory_utilization={cfg['util']})")
    for shard in range(1, shards + 1):
        time.sleep(seconds / shards)
        pct = 100 * shard // shards
        log(f"Loading safetensors checkpoint shards: {pct:3d}% Completed | {shard}/{shards}")
    message = oom_message(cfg)
    if message is not None:
        trace = [
            "ERROR [core.py:708] EngineCore failed to start.",
            "Traceback (most recent call last):",
            '  File "vllm/v1/engine/core.py", line 95, in __init__',
            message,
            "RuntimeError: Engine core initialization failed. See root cause above.",
        ]
        print("\n".join(trace), file=sys.stderr, flush=True)
        os._exit(1)  # no clean shutdown: the engine never came up
    log(f"Loading weights took {seconds:.2f} seconds")
    state["loaded"] = True


class Engine:
    """Deterministic generation plus vLLM's Prometheus metrics."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.delay = float(os.environ.get("FAKE_VLLM_TOKEN_DELAY", "0"))
        self.die_after = int(os.environ.get("FAKE_VLLM_DIE_AFTER", "0")) or None
        self.slots = asyncio.Semaphore(cfg["max_num_seqs"])  # more requests wait, as in vLLM
        self.registry = reg = CollectorRegistry()
        labels = ["model_name", "engine"]
        self.running = Gauge("vllm:num_requests_running", "Running", labels, registry=reg)
        self.waiting = Gauge("vllm:num_requests_waiting", "Waiting", labels, registry=reg)
        self.kv = Gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage, 1 = 100%", labels, registry=reg
        )
        self.prompt = Counter("vllm:prompt_tokens", "Prefill tokens", labels, registry=reg)
        self.gen = Counter("vllm:generation_tokens", "Generation tokens", labels, registry=reg)
        self.success = Counter(
            "vllm:request_success", "Finished", [*labels, "finished_reason"], registry=reg
        )
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "TTFT", labels, registry=reg)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "E2E", labels, registry=reg)
        self.label = {"model_name": cfg["names"][0], "engine": "0"}
        self.cached = 0  # tokens held in the KV cache by running requests
        # vLLM exports every series from the start, at zero.
        for metric in (self.running, self.waiting, self.kv, self.prompt, self.gen, self.ttft):
            metric.labels(**self.label)
        self.e2e.labels(**self.label)
        for reason in ("stop", "length", "abort"):
            self.success.labels(**self.label, finished_reason=reason)

    def _hold(self, tokens: int) -> None:
        self.cached += tokens
        usage = min(1.0, self.cached / self.cfg["max_model_len"])
        self.kv.labels(**self.label).set(usage)

    async def generate(self, prompt_tokens: int, n: int, stops: list[str]) -> Any:
        """Yield (index, word) per token, then ("end", finish_reason, stop_reason)."""
        m = self.label
        self.waiting.labels(**m).inc()
        async with self.slots:
            self.waiting.labels(**m).dec()
            self.running.labels(**m).inc()
            self.prompt.labels(**m).inc(prompt_tokens)
            start, finish, stop_reason, held = time.monotonic(), "abort", None, prompt_tokens
            self._hold(prompt_tokens)
            try:
                for i in range(n):
                    if self.die_after is not None and i >= self.die_after:
                        await asyncio.sleep(0.05)  # let what was sent reach the socket
                        log("RuntimeError: CUDA error: unspecified launch failure")
                        os._exit(1)
                    await asyncio.sleep(self.delay)
                    word = f"tok{i}"
                    if word in stops:
                        finish, stop_reason = "stop", word
                        break
                    if i == 0:
                        self.ttft.labels(**m).observe(time.monotonic() - start)
                    self.gen.labels(**m).inc()
                    self._hold(1)
                    held += 1
                    yield i, word
                else:
                    finish = "length"
                yield "end", finish, stop_reason
            finally:
                self._hold(-held)
                self.running.labels(**m).dec()
                self.e2e.labels(**m).observe(time.monotonic() - start)
                self.success.labels(**m, finished_reason=finish).inc()


def error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


def words(text: Any) -> int:
    if isinstance(text, str):
        return len(text.split())
    if isinstance(text, list):  # content parts, prompt lists or token ids
        return sum(
            1 if isinstance(x, int) else words(x.get("text", "") if isinstance(x, dict) else x)
            for x in text
        )
    return 0


def tool_call(body: dict[str, Any]) -> dict[str, Any] | None:
    """An OpenAI-shaped tool call when tools are offered and the user asks for one."""
    users = [m for m in body["messages"] if m.get("role") == "user"]
    text = json.dumps(users[-1].get("content")) if users else ""
    tools = body.get("tools") or []
    if not tools or TOOL_TRIGGER not in text.lower():
        return None
    fn = tools[0].get("function", {})
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        fn = next(
            (t["function"] for t in tools if t["function"]["name"] == choice["function"]["name"]),
            fn,
        )
    required = fn.get("parameters", {}).get("required", [])
    arguments = json.dumps({name: "tok0" for name in required})
    return {
        "id": f"chatcmpl-tool-{uuid.uuid4().hex[:16]}",
        "type": "function",
        "function": {"name": fn.get("name", "tool"), "arguments": arguments},
    }


def build_app(cfg: dict[str, Any], state: dict[str, Any]) -> Starlette:
    engine = Engine(cfg)
    api_key = cfg["api_key"]

    def refusal(request: Request) -> Response | None:
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            return JSONResponse({"error": "Unauthorized"}, status_code=401)  # vLLM's own shape
        if not state["loaded"]:  # real vLLM is not listening yet; say so rather than hang
            return error(503, "The model is still loading.", "ServiceUnavailableError")
        if state["dead"]:
            return error(500, "EngineCore encountered an issue.", "InternalServerError")
        return None

    async def health(_: Request) -> Response:
        return Response(status_code=200 if state["loaded"] and not state["dead"] else 503)

    async def version(_: Request) -> Response:
        return JSONResponse({"version": VERSION})

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(engine.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(request: Request) -> Response:
        if (refused := refusal(request)) is not None:
            return refused
        data = [
            {
                "id": name,
                "object": "model",
                "created": int(state["started"]),
                "owned_by": "vllm",
                "root": cfg["model"],
                "parent": None,
                "max_model_len": cfg["max_model_len"],
                "permission": [],
            }
            for name in cfg["names"]
        ]
        return JSONResponse({"object": "list", "data": data})

    async def complete(request: Request) -> Response:
        if (refused := refusal(request)) is not None:
            return refused
        chat = request.url.path.endswith("/chat/completions")
        try:
            body = json.loads(await request.body())
            assert isinstance(body, dict), "the body must be a JSON object"
            prompt = body["messages"] if chat else body["prompt"]
            assert isinstance(prompt, list if chat else (str, list)), "bad messages/prompt"
            n = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
            assert n >= 1, "max_tokens must be at least 1"
            stops = body.get("stop") or []
            stops = [stops] if isinstance(stops, str) else [str(s) for s in stops]
            prompt_tokens = words([m.get("content") or "" for m in prompt] if chat else prompt)
            call = tool_call(body) if chat else None
            model = str(body.get("model") or cfg["names"][0])
        except (ValueError, KeyError, TypeError, AssertionError, AttributeError) as exc:
            return error(400, f"invalid request body: {exc!r}", "BadRequestError")
        if model not in cfg["names"]:
            return error(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        if prompt_tokens + n > cfg["max_model_len"]:
            message = (
                f"This model's maximum context length is {cfg['max_model_len']} tokens. However, "
                f"you requested {prompt_tokens + n} tokens ({prompt_tokens} in the messages, "
                f"{n} in the completion). Please reduce the length of the messages or completion."
            )
            return error(400, message, "BadRequestError")
        kind = "chat.completion" if chat else "text_completion"
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": rid, "object": kind, "created": int(time.time()), "model": model}

        def usage(completion: int) -> dict[str, int]:
            return {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion,
            }

        def choice(
            delta: dict[str, Any] | str, finish: str | None, stop: str | None = None, index: int = 0
        ) -> Any:
            part = ({"delta": delta} if stream else {"message": delta}) if chat else {"text": delta}
            return {
                "index": index,
                **part,
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": stop,
            }

        stream = bool(body.get("stream"))
        many = not chat and isinstance(prompt, list) and prompt and not isinstance(prompt[0], int)
        width = (1 if call else int(body.get("n") or 1)) * (len(prompt) if many else 1)
        tokens = engine.generate(prompt_tokens, 1 if call else n, stops)
        if not stream:
            answers, count = [], 0
            for index in range(width):
                text, finish, stop = [], "length", None
                gen = tokens if index == 0 else engine.generate(prompt_tokens, n, stops)
                async for item in gen:
                    if item[0] == "end":
                        _, finish, stop = item
                    else:
                        text.append(item[1])
                        count += 1
                out = " ".join(text)
                msg = {"role": "assistant", "content": out, "tool_calls": []} if chat else out
                answers.append(choice(msg, finish, stop, index))
            if call:
                msg = {"role": "assistant", "content": None, "tool_calls": [call]}
                answers = [choice(msg, "tool_calls")]
            answer = {**head, "choices": answers, "usage": usage(count)}
            if os.environ.get("FAKE_VLLM_NO_USAGE") == "1":
                del answer["usage"]
            return JSONResponse(answer)

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        head = {**head, "object": f"{kind}.chunk"} if chat else head

        async def events() -> Any:
            try:
                async for chunk in chunks():
                    yield chunk
            finally:
                await tokens.aclose()  # a client that hangs up ends the request (vLLM: abort)

        async def chunks() -> Any:
            def sse(payload: dict[str, Any]) -> str:
                return f"data: {json.dumps(payload)}\n\n"

            count, per_event = 0, int(os.environ.get("FAKE_VLLM_TOKENS_PER_EVENT", "1"))
            for index in range(width):
                gen = tokens if index == 0 else engine.generate(prompt_tokens, n, stops)
                pending: list[str] = []

                def flush(index: int = index, pending: list[str] = pending) -> str:
                    text = "".join(pending)
                    pending.clear()
                    delta = {"content": text} if chat else text
                    return sse({**head, "choices": [choice(delta, None, None, index)]})

                if chat:
                    role = {"role": "assistant", "content": ""}
                    yield sse({**head, "choices": [choice(role, None, None, index)]})
                async for item in gen:
                    if item[0] == "end":
                        _, finish, stop = item
                        if pending:
                            yield flush()
                        if call:
                            delta = {"tool_calls": [{"index": 0, **call}]}
                            yield sse({**head, "choices": [choice(delta, None)]})
                            finish, stop = "tool_calls", None
                        end = choice({} if chat else "", finish, stop, index)
                        yield sse({**head, "choices": [end]})
                    elif not call:
                        pending.append(item[1] if item[0] == 0 else f" {item[1]}")
                        count += 1
                        if len(pending) >= per_event:
                            yield flush()
                    else:
                        count += 1
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage(count)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/version", version),
            Route("/metrics", metrics),
            Route("/v1/models", models),
            Route("/v1/chat/completions", complete, methods=["POST"]),
            Route("/v1/completions", complete, methods=["POST"]),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    cfg = parse_argv(sys.argv[1:] if argv is None else argv)
    state = {"loaded": False, "dead": False, "started": time.time()}
    log(f"vLLM API server version {VERSION} (fake)")
    log(f"non-default args: { {k: v for k, v in cfg.items() if k != 'api_key'} }")
    signal.signal(signal.SIGUSR1, lambda *_: state.update(dead=True))
    if os.environ.get("FAKE_VLLM_BIND_LATE") == "1":
        load_model(cfg, state)
    else:
        threading.Thread(target=load_model, args=(cfg, state), daemon=True).start()
    log(f"Starting vLLM API server 0 on http://{cfg['host']}:{cfg['port']}")
    uvicorn.run(
        build_app(cfg, state),
        host=cfg["host"],
        port=cfg["port"],
        log_level="info",
        access_log=False,
    )


if __name__ == "__main__":
    main()
