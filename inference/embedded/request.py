"""A request as the engine holds it, the Outputs it yields, and the caller's handle on it."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from inference.embedded.detok import IncrementalDetokenizer, StopChecker
from inference.embedded.sampling import SamplingParams


class EngineListener(Protocol):
    """Hooks for metrics; called on the worker thread, so keep them cheap and thread-safe."""

    def on_prompt(self, req: Request) -> None: ...

    def on_token(self, req: Request, now: float) -> None: ...

    def on_finish(self, req: Request, now: float) -> None: ...


@dataclass
class Output:
    """One step of one request: new text and tokens, and how it ended (on the last one)."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or stop token id hit
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache


_ids = itertools.count(1)


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[Output], None]
    id: int = field(default_factory=lambda: next(_ids))
    arrival: float = field(default_factory=time.monotonic)
    admitted: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    output_ids: list[int] = field(default_factory=list)
    prefilled: int = 0
    cached_tokens: int = 0
    cache: Any = None
    finish_reason: str | None = None
    cancelled: bool = False
    detok: IncrementalDetokenizer | None = None
    stops: StopChecker | None = None
    gen: torch.Generator | None = None


class RequestHandle:
    """The caller's side of a request: iterate its Outputs (async or not), or cancel it."""

    def __init__(
        self, cancel: Callable[[Request], None], loop: asyncio.AbstractEventLoop | None
    ) -> None:
        self._cancel = cancel
        self._loop = loop
        self._aq: asyncio.Queue[Output] | None = asyncio.Queue() if loop else None
        self._q: queue.SimpleQueue[Output] | None = None if loop else queue.SimpleQueue()
        self.request: Request | None = None

    def _deliver(self, out: Output) -> None:  # worker thread
        if self._aq is not None and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
                self._loop.call_soon_threadsafe(self._aq.put_nowait, out)
        elif self._q is not None:
            self._q.put(out)

    def cancel(self) -> None:
        if self.request is not None:
            self._cancel(self.request)

    async def __aiter__(self) -> AsyncIterator[Output]:
        assert self._aq is not None, "submitted without an event loop: iterate synchronously"
        while True:
            out = await self._aq.get()
            yield out
            if out.finish_reason is not None:
                return

    def __iter__(self) -> Iterator[Output]:
        assert self._q is not None, "submitted with an event loop: iterate with `async for`"
        while True:
            out = self._q.get()
            yield out
            if out.finish_reason is not None:
                return


@dataclass
class Completion:
    """A finished request, gathered (for non-streaming callers, tests and the benchmark)."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str | None
    stop_reason: str | int | None
