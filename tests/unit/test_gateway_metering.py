"""The usage writer: batches off the caller's thread, loses nothing at close, survives a failing
batch, writes settlements and refused rows in one pass; and the price table."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from inference.metering import UsageWriter, cost_of
from inference.ports import Settlement, Spend, UsageRecord


class SlowLedger:
    def __init__(self, delay: float = 0.0, fail_batches: int = 0) -> None:
        self.rows: list[UsageRecord] = []
        self.settled: list[Settlement] = []
        self.batches: list[int] = []
        self.delay = delay
        self.fail_batches = fail_batches
        self.threads: set[str] = set()

    def record_usage(self, usage: UsageRecord) -> None:
        self.rows.append(usage)

    def record_usages(self, usages: Sequence[UsageRecord]) -> None:
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        if self.fail_batches:
            self.fail_batches -= 1
            raise RuntimeError("disk full")
        self.batches.append(len(usages))
        self.rows.extend(usages)

    def settle(self, settlements: Sequence[Settlement]) -> None:
        self.threads.add(threading.current_thread().name)
        self.settled.extend(settlements)

    def spend(self, key_id: str, now: float | None = None) -> Spend:
        return Spend()


def rec(key: str, tokens: int, cost: float = 0.0) -> UsageRecord:
    return UsageRecord(key, "m", tokens, 0, 0.01, 200, True, cost, time.time())


def test_close_drains_everything_queued() -> None:
    ledger = SlowLedger(delay=0.02)
    writer = UsageWriter(ledger)
    for i in range(200):
        writer.submit(rec("k", i))
    assert len(ledger.rows) < 200  # the slow ledger is behind
    writer.close()
    assert len(ledger.rows) == 200
    assert len(ledger.batches) < 200  # batched, not row by row
    assert ledger.threads == {"usage-writer"}


def test_settlements_and_rows_share_the_writer() -> None:
    ledger = SlowLedger()
    writer = UsageWriter(ledger)
    writer.submit(rec("a", 1))
    done = Settlement("req_1", "a", "m", 3, 4, 0.0, 0.1, 200, "ok", time.time())
    writer.submit(done)
    writer.flush()
    assert [r.prompt_tokens for r in ledger.rows] == [1] and ledger.settled == [done]
    writer.close()


def test_a_failing_batch_is_retried_row_by_row() -> None:
    ledger = SlowLedger(fail_batches=1)
    writer = UsageWriter(ledger)
    for i in range(5):
        writer.submit(rec("k", i))
    writer.close()
    assert sorted(r.prompt_tokens for r in ledger.rows) == [0, 1, 2, 3, 4]


def test_submit_after_close_writes_synchronously() -> None:
    ledger = SlowLedger()
    writer = UsageWriter(ledger)
    writer.close()
    writer.submit(rec("k", 3))
    assert len(ledger.rows) == 1


def test_cost_from_price_table() -> None:
    prices = {"remote": (2.0, 6.0)}
    assert cost_of(prices, "remote", 1_000_000, 500_000) == 5.0
    assert cost_of(prices, "local", 10**9, 10**9) == 0.0
