"""Bounded lanes for the API's blocking work, so the data plane never starves the control plane.

A sync route runs in anyio's default thread pool (40 threads, shared by every sync route and
dependency). An agent turn may run an hour and a sandbox exec ten minutes: forty of them would
fill it, and `POST /kill` would wait behind them. So turns and execs run on lanes of their own,
each with a few slots; a call that finds its lane full is refused at once with BusyError (429),
never queued. The kill switch, release and status have their own lane too: they queue (each
ends within seconds) but never behind a turn or an exec. What every request may need before or
after its route, a token's lookup (api/deps.py) and its audit-trail record (api/audit_trail.py),
has a lane each as well, so neither waits behind the shared pool's slow sync routes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread

from appliance.errors import BusyError

T = TypeVar("T")

TURN_SLOTS = 8  # agent turns at once (each may run up to an hour)
EXEC_SLOTS = 8  # sandbox execs at once (each may run up to 10 minutes)
CONTROL_SLOTS = 8  # kill, release, status (each ends within seconds)
AUTH_SLOTS = 4  # operator token lookups (one indexed SELECT each)
AUDIT_SLOTS = 4  # audit-trail records (a lock and an fdatasync each)


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

    async def run(self, func: Callable[..., T], *args: object) -> T:
        if self.refuse_when_full and self._running >= self.slots:
            raise BusyError(
                f"{self.slots} {self.what} are running already; this one was not started"
            )
        self._running += 1  # on the event loop's thread, with no await since the check
        try:
            return await anyio.to_thread.run_sync(func, *args, limiter=self._threads())
        finally:
            self._running -= 1


TURNS = Lane("agent turns", TURN_SLOTS, refuse_when_full=True)
EXECS = Lane("sandbox execs", EXEC_SLOTS, refuse_when_full=True)
CONTROL = Lane("kill switch and status calls", CONTROL_SLOTS, refuse_when_full=False)
AUTH = Lane("token lookups", AUTH_SLOTS, refuse_when_full=False)
AUDIT = Lane("audit-trail records", AUDIT_SLOTS, refuse_when_full=False)
