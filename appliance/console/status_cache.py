"""The status report for the console's pages, gathered off the event loop and shared.

`plane.status()` asks the GPUs, the backend's /metrics, the store and each proxy: tens of
milliseconds to a second. Every open console tab polls it every 2 s; one gathering at a time
answers all of them (single flight), and a report younger than MAX_AGE_S is reused.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from appliance.control.api import lanes

MAX_AGE_S = 1.0


class StatusCache:
    def __init__(self, max_age_s: float = MAX_AGE_S, clock: Callable[[], float] = time.monotonic):
        self.max_age_s = max_age_s
        self.clock = clock
        self._report: dict[str, Any] | None = None
        self._taken = 0.0
        self._lock: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None

    def _gate(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()  # tests run several loops in turn: a lock per loop
        if self._lock is None or self._lock[0] is not loop:
            self._lock = (loop, asyncio.Lock())
        return self._lock[1]

    async def get(self, gather: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        async with self._gate():
            if self._report is None or self.clock() - self._taken > self.max_age_s:
                # The control lane: never behind agent turns, execs or the shared pool.
                self._report = await lanes.CONTROL.run(gather)
                self._taken = self.clock()
            return self._report

    def forget(self) -> None:
        """After an action (a kill): the next page shows the state it left, not the one before."""
        self._report = None
