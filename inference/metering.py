"""Metering: turn tokens into cost, and write usage records off the event loop.

The gateway hands every finished request to a UsageWriter; one daemon thread drains the queue in
batches (one SQLite transaction per batch), so a slow disk never stalls streaming. close() drains
whatever is left, which the gateway calls on lifespan shutdown: a clean stop loses no rows.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import defaultdict
from collections.abc import Mapping

from inference.ports import Ledger, UsageRecord

log = logging.getLogger(__name__)

_STOP = object()


def cost_of(
    prices: Mapping[str, tuple[float, float]], model: str, prompt: int, completion: int
) -> float:
    """Cost in the price table's currency; prices are per 1M prompt / completion tokens."""
    price = prices.get(model)
    if price is None:
        return 0.0  # local models are free
    return (prompt * price[0] + completion * price[1]) / 1_000_000


class UsageWriter:
    """Batched, thread-backed ledger writer that also tracks what it has not written yet."""

    def __init__(self, ledger: Ledger, max_batch: int = 256) -> None:
        self._ledger = ledger
        self._max_batch = max_batch
        self._queue: queue.Queue[object] = queue.Queue()
        self._lock = threading.Lock()
        # Queued but not committed, per key: budgets add it to the stored spend so a burst of
        # requests cannot outrun the writer.
        self._pending: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        self._thread = threading.Thread(target=self._run, name="usage-writer", daemon=True)
        self._closed = False
        self._thread.start()

    def submit(self, usage: UsageRecord) -> None:
        if self._closed:  # late request after shutdown began: write it synchronously
            self._ledger.record_usage(usage)
            return
        with self._lock:
            p = self._pending[usage.key_id]
            p[0] += usage.prompt_tokens + usage.completion_tokens
            p[1] += usage.cost
        self._queue.put(usage)

    def pending(self, key_id: str) -> tuple[int, float]:
        with self._lock:
            p = self._pending.get(key_id)
            return (int(p[0]), p[1]) if p else (0, 0.0)

    def flush(self, timeout: float = 10.0) -> None:
        """Block until every record submitted so far is committed."""
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            while len(items) < self._max_batch:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._write([i for i in items if isinstance(i, UsageRecord)])
            stop = False
            for item in items:  # flush markers are released only after the rows before them
                if isinstance(item, threading.Event):
                    item.set()
                elif item is _STOP:
                    stop = True
            if stop:
                self._drain()
                return

    def _drain(self) -> None:
        rest: list[UsageRecord] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, UsageRecord):
                rest.append(item)
            elif isinstance(item, threading.Event):
                item.set()
        self._write(rest)

    def _write(self, batch: list[UsageRecord]) -> None:
        if not batch:
            return
        try:
            self._ledger.record_usages(batch)
        except Exception:  # keep the writer alive; one bad batch must not stop metering
            log.exception("ledger write failed; retrying the %d rows one by one", len(batch))
            for usage in batch:
                try:
                    self._ledger.record_usage(usage)
                except Exception:
                    log.exception("ledger row lost: %s", usage)
        with self._lock:
            for usage in batch:
                p = self._pending[usage.key_id]
                p[0] -= usage.prompt_tokens + usage.completion_tokens
                p[1] -= usage.cost
                if p[0] <= 0 and p[1] <= 1e-12:
                    del self._pending[usage.key_id]
