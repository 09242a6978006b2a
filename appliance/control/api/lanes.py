"""Bounded lanes for the API's blocking work, so the data plane never starves the control plane.

A sync route runs in anyio's default thread pool (40 threads, shared by every sync route and
dependency). An agent turn may run an hour and a sandbox exec ten minutes: forty of them would
fill it, and `POST /kill` would wait behind them. So turns and execs run on lanes of their own,
each with a few slots; a call that finds its lane full is refused at once with BusyError (429),
never queued (a streamed turn holds its slot until its stream ends). The kill switch, release
and status have their own lane too: they queue (each ends within seconds) but never behind a turn
or an exec. What every request may need before or after its route, a token's lookup (api/deps.py)
and its audit-trail record (api/audit_trail.py), has a lane each as well, so neither waits behind
the shared pool's slow sync routes. The web console's reads (status, pending approvals,
history, one-tap pages) and its approval decisions have a lane of their own: open tabs polling
a hung proxy must never make a kill wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

import anyio
import anyio.to_thread

from appliance.errors import BusyError

T = TypeVar("T")

TURN_SLOTS = 8  # agent turns at once (each may run up to an hour)
EXEC_SLOTS = 8  # sandbox execs at once (each may run up to 10 minutes)
CONTROL_SLOTS = 8  # kill, release, status (each ends within seconds)
AUTH_SLOTS = 4  # operator token lookups (one indexed SELECT each)
AUDIT_SLOTS = 4  # audit-trail records (a lock and an fdatasync each)
CONSOLE_SLOTS = 8  # the console's reads and approvals (a hung proxy holds one up to 5 s)


class Lane:
    def __init__(self, what: str, slots: int, refuse_when_full: bool) -> None:
        self.what = what
        self.slots = slots
        self.refuse_when_full = refuse_when_full
        # Made on first use, per event loop (the server runs one; tests run several in turn).
        self._limiter: tuple[asyncio.AbstractEventLoop, anyio.CapacityLimiter] | None = None
        self._running = 0  # counted here, not by the limiter: its acquire comes after an await

    def _threads(self) -> anyio.CapacityLimiter:
        loop = asyncio.get_running_loop()
        if self._limiter is None or self._limiter[0] is not loop:
            self._limiter = (loop, anyio.CapacityLimiter(self.slots))
        return self._limiter[1]

    def _claim(self) -> None:
        """Count one more call (event-loop thread only), or BusyError when refusing and full."""
        if self.refuse_when_full and self._running >= self.slots:
            raise BusyError(
                f"{self.slots} {self.what} are running already; this one was not started"
            )
        self._running += 1  # on the event loop's thread, with no await since the check

    async def call(self, func: Callable[..., T], *args: object) -> T:
        """`func` on one of the lane's threads (the caller holds a slot)."""
        return await anyio.to_thread.run_sync(func, *args, limiter=self._threads())

    async def run(self, func: Callable[..., T], *args: object) -> T:
        self._claim()
        try:
            return await self.call(func, *args)
        finally:
            self._running -= 1

    async def open(self, start: Callable[..., Iterator[T]], *args: object) -> LaneStream[T]:
        """`start(*args)` on the lane (its errors raised here, before a response starts), then
        its items, each fetched on the lane. The slot is held until the stream is closed: a turn
        streamed for an hour holds it for an hour, as a turn answered whole does."""
        self._claim()
        try:
            items = await self.call(start, *args)
        except BaseException:
            self._running -= 1
            raise
        return LaneStream(self, items)


class LaneStream(Generic[T]):
    """A sync iterator's items, each fetched on its lane; `aclose` (idempotent) closes the
    iterator on the lane (a generator's `finally` runs: a turn records itself as cancelled) and
    gives the slot back."""

    def __init__(self, lane: Lane, items: Iterator[T]) -> None:
        self.lane = lane
        self.items = items
        self.closed = False

    def __aiter__(self) -> LaneStream[T]:
        return self

    async def __anext__(self) -> T:
        if self.closed:
            raise StopAsyncIteration
        # Not abandoned on cancel: a cancelled caller waits for this item, so `aclose` never
        # finds the generator still running on another thread.
        item = await self.lane.call(next, self.items, _END)
        if item is _END:
            await self.aclose()
            raise StopAsyncIteration
        return item  # type: ignore[return-value]

    def interrupt(self) -> None:
        """Its consumer is gone (event-loop thread): an iterator with `interrupt()` (a turn
        waiting on its runtime) stops waiting for its next item now; `aclose` follows."""
        interrupt = getattr(self.items, "interrupt", None)
        if interrupt is not None and not self.closed:
            interrupt()

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            close = getattr(self.items, "close", None)
            if close is not None:
                with anyio.CancelScope(shield=True):  # also when the request was cancelled
                    await self.lane.call(close)
        finally:
            self.lane._running -= 1


_END = object()  # `next`'s default: the iterator is exhausted


TURNS = Lane("agent turns", TURN_SLOTS, refuse_when_full=True)
EXECS = Lane("sandbox execs", EXEC_SLOTS, refuse_when_full=True)
CONTROL = Lane("kill switch and status calls", CONTROL_SLOTS, refuse_when_full=False)
AUTH = Lane("token lookups", AUTH_SLOTS, refuse_when_full=False)
AUDIT = Lane("audit-trail records", AUDIT_SLOTS, refuse_when_full=False)
CONSOLE = Lane("console reads and approvals", CONSOLE_SLOTS, refuse_when_full=False)
