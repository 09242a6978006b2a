"""Reads the console's pages share: gathered off the event loop, one at a time, briefly reused.

`plane.status()` asks the GPUs, the backend's /metrics, the store and each proxy; the approvals'
pending list asks every proxy (up to ADMIN_TIMEOUT_S each when one hangs). Every open console tab
polls them every second or two: one gathering at a time answers all of them (single flight), and
a result younger than `max_age_s` is reused, so N tabs cost one gathering, not N.

They run on lanes.CONSOLE, never lanes.CONTROL: console reads queued behind a hung proxy must not
make the kill switch wait.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from appliance.control.api import lanes

T = TypeVar("T")

STATUS_MAX_AGE_S = 1.0
PENDING_MAX_AGE_S = 0.5  # a new held request shows within a poll or two


class SharedRead(Generic[T]):
    def __init__(
        self, max_age_s: float = STATUS_MAX_AGE_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_age_s = max_age_s
        self.clock = clock
        self._value: T | None = None
        self._taken = 0.0
        self._fresh = False
        self._lock: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None

    def _gate(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()  # tests run several loops in turn: a lock per loop
        if self._lock is None or self._lock[0] is not loop:
            self._lock = (loop, asyncio.Lock())
        return self._lock[1]

    async def get(self, gather: Callable[[], T]) -> T:
        async with self._gate():
            if not self._fresh or self.clock() - self._taken > self.max_age_s:
                self._value = await lanes.CONSOLE.run(gather)
                self._taken = self.clock()
                self._fresh = True
            return self._value  # type: ignore[return-value]

    def forget(self) -> None:
        """After an action (a kill, a decision): the next page shows the state it left."""
        self._fresh = False
