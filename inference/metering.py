"""Metering: turn tokens into cost, and write usage records off the event loop.

The gateway hands every finished request to a UsageWriter (a Settlement of its open ledger row,
or a UsageRecord for a request refused before admission); one daemon thread drains the queue in
batches (one SQLite transaction per kind and batch), so a slow disk never stalls streaming.
close() drains whatever is left, which the gateway calls on lifespan shutdown: a clean stop loses
no rows. Until a settlement is committed its row stays open and its reservation keeps counting
against the budget, so a queue that lags never lets spend outrun the limits.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Mapping

from inference.ports import Ledger, Settlement, UsageRecord

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
    """Batched, thread-backed ledger writer."""

    def __init__(self, ledger: Ledger, max_batch: int = 256) -> None:
        self._ledger = ledger
        self._max_batch = max_batch
        self._queue: queue.Queue[object] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="usage-writer", daemon=True)
        self._closed = False
        self._thread.start()

    def submit(self, item: UsageRecord | Settlement) -> None:
        if self._closed:  # late request after shutdown began: write it synchronously
            self._write([item])
            return
        self._queue.put(item)

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
            self._write([i for i in items if isinstance(i, UsageRecord | Settlement)])
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
        rest: list[UsageRecord | Settlement] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, UsageRecord | Settlement):
                rest.append(item)
            elif isinstance(item, threading.Event):
                item.set()
        self._write(rest)

    def _write(self, batch: list[UsageRecord | Settlement]) -> None:
        records = [i for i in batch if isinstance(i, UsageRecord)]
        settlements = [i for i in batch if isinstance(i, Settlement)]
        for kind, items in (("record_usages", records), ("settle", settlements)):
            if not items:
                continue
            write = getattr(self._ledger, kind)
            try:
                write(items)
            except Exception:  # keep the writer alive; one bad batch must not stop metering
                log.exception(
                    "ledger write failed; retrying the %d %s one by one", len(items), kind
                )
                for item in items:
                    try:
                        write([item])
                    except Exception:
                        log.exception("ledger write lost: %s", item)
