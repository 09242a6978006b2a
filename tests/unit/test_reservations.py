"""Budget reservations: the admission math (inference/budgets.grant), the store's atomic
reserve / settle / interrupt (appliance/store/ledger.py, also across processes), the migration of
an existing ledger, and the owner tokens that tell a dead gateway's open rows."""

from __future__ import annotations

import multiprocessing
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.store.db import DB_NAME, open_store
from appliance.store.inference_store import InferenceStore
from appliance.store.migrations import MIGRATIONS
from inference import budgets as b
from inference.gateway.admission import owner_alive, process_token
from inference.ports import Budget, Reservation, Settlement, Spend, UsageRecord

NOW = 1_795_000_000.0  # 2026-11-18, mid-month


def ask(prompt: int = 100, completion: int = 50, choices: int = 1, **kw: float) -> b.Ask:
    return b.Ask(prompt, completion, choices, **kw)


# -- the math ------------------------------------------------------------------------------


def test_no_budget_grants_the_ask() -> None:
    g = b.grant(None, Spend(), Spend(), ask(), NOW)
    assert g.admitted and g.completion_tokens == 50 and g.state == "ok"


def test_max_tokens_is_capped_by_what_is_left() -> None:
    budget = Budget("k", daily_tokens=1000)
    g = b.grant(budget, Spend(day_tokens=700, month_tokens=700), Spend(), ask(100, 500), NOW)
    assert g.admitted and g.completion_tokens == 200  # 1000 - 700 - 100


def test_open_reservations_count_like_spend() -> None:
    budget = Budget("k", daily_tokens=1000)
    held = Spend(day_tokens=850, month_tokens=850)
    g = b.grant(budget, Spend(), held, ask(100, 500), NOW)
    assert g.admitted and g.completion_tokens == 50
    g = b.grant(budget, Spend(), Spend(day_tokens=901, month_tokens=901), ask(100, 500), NOW)
    assert not g.admitted and g.blocking is not None and g.blocking.name == "daily_tokens"


def test_choices_multiply_the_completion() -> None:
    budget = Budget("k", daily_tokens=1000)
    g = b.grant(budget, Spend(), Spend(), ask(100, 500, choices=3), NOW)
    assert g.completion_tokens == 300  # (1000 - 100) / 3


def test_warning_counts_this_reservation() -> None:
    budget = Budget("k", daily_tokens=1000)
    g = b.grant(budget, Spend(day_tokens=600, month_tokens=600), Spend(), ask(100, 100), NOW)
    assert g.warning_header() == "daily tokens 80% of 1000" and g.state == "warning"
    g = b.grant(budget, Spend(day_tokens=590, month_tokens=590), Spend(), ask(100, 100), NOW)
    assert g.warning_header() is None and g.state == "ok"


def test_monthly_limit_caps_first() -> None:
    budget = Budget("k", daily_tokens=10_000, monthly_tokens=1000)
    g = b.grant(budget, Spend(month_tokens=800), Spend(), ask(100, 500), NOW)
    assert g.completion_tokens == 100


def test_cost_limit_caps_by_price() -> None:
    budget = Budget("k", daily_cost=1.0)
    a = ask(100, 10_000, prompt_price=0.001, completion_price=0.002)  # prompt 0.1
    g = b.grant(budget, Spend(day_cost=0.5, month_cost=0.5), Spend(), a, NOW)
    assert g.completion_tokens == 200  # (1.0 - 0.5 - 0.1) / 0.002


def test_a_free_model_passes_a_cost_limit_until_it_is_used_up() -> None:
    budget = Budget("k", monthly_cost=1.0)
    g = b.grant(budget, Spend(month_cost=0.99), Spend(), ask(), NOW)
    assert g.admitted and g.completion_tokens == 50
    g = b.grant(budget, Spend(month_cost=1.0), Spend(), ask(), NOW)
    assert not g.admitted and g.exhausted and g.spent_out and g.state == "monthly_exceeded"


def test_an_oversized_request_is_refused_without_exhausting_the_key() -> None:
    """A 5,000-token prompt against a 10,000-token month half spent: refused, but the key is
    not stopped (the hard stop follows ordinary requests, < 20 % of the limit)."""
    budget = Budget("k", monthly_tokens=10_000)
    g = b.grant(budget, Spend(month_tokens=5000), Spend(), ask(5001, 10), NOW)
    assert not g.admitted and not g.exhausted and not g.spent_out and g.state == "ok"


def test_spent_out_needs_settled_spend_not_reservations() -> None:
    budget = Budget("k", monthly_tokens=10_000)
    held = Spend(month_tokens=9_950)  # in flight, may be released
    g = b.grant(budget, Spend(), held, ask(100, 10), NOW)
    assert not g.admitted and g.exhausted and not g.spent_out
    g = b.grant(budget, Spend(month_tokens=9_950), Spend(), ask(100, 10), NOW)
    assert not g.admitted and g.exhausted and g.spent_out and g.state == "monthly_exceeded"


# -- the store -----------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> InferenceStore:
    s = InferenceStore(tmp_path)
    yield s
    s.close()


def reservation(rid: str, tokens: int = 100, owner: str = "", ts: float | None = None):
    return Reservation(rid, "k", "m", False, tokens // 2, tokens - tokens // 2, 0.0,
                       ts or time.time(), owner or process_token())  # fmt: skip


def test_reserve_settle_and_spend(store: InferenceStore) -> None:
    seen: list[tuple[Spend, Spend]] = []

    def decide(settled: Spend, reserved: Spend) -> Reservation:
        seen.append((settled, reserved))
        return reservation(f"r{len(seen)}")

    now = time.time()
    store.reserve("k", now, decide)
    store.reserve("k", now, decide)
    assert seen[1] == (Spend(), Spend(100, 100, 0.0, 0.0))
    assert store.reserved("k").day_tokens == 200 and store.spend("k").day_tokens == 0
    store.settle([Settlement("r1", "k", "m", 10, 20, 0.0, 0.1, 200, "ok", now)])
    assert store.reserved("k").day_tokens == 100 and store.spend("k").day_tokens == 30
    store.settle([Settlement("r1", "k", "m", 99, 99, 0.0, 0.1, 200, "ok", now)])  # twice: no-op
    assert store.spend("k").day_tokens == 30
    [one, two] = store.ledger_entries("k")
    assert (one["state"], one["prompt_tokens"], one["reserved_tokens"]) == ("ok", 10, 100)
    assert two["state"] == "open"


def test_a_refused_decision_writes_nothing(store: InferenceStore) -> None:
    assert store.reserve("k", time.time(), lambda s, r: None) is None
    assert store.ledger_entries("k") == []


def test_interrupt_settles_only_dead_owners(store: InferenceStore) -> None:
    now = time.time()
    store.reserve("k", now, lambda s, r: reservation("mine"))
    store.reserve("k", now, lambda s, r: reservation("dead", 300, owner="1:1"))
    assert store.interrupt_open(owner_alive) == 1
    rows = {r["request_id"]: r for r in store.ledger_entries("k")}
    assert rows["mine"]["state"] == "open"
    dead = rows["dead"]
    assert dead["state"] == "interrupted"
    assert dead["prompt_tokens"] + dead["completion_tokens"] == 300  # charged the reservation
    assert store.spend("k").day_tokens == 300 and store.reserved("k").day_tokens == 100


def test_refused_rows_are_written_settled(store: InferenceStore) -> None:
    store.record_usage(UsageRecord("k", "m", 0, 0, 0.01, 429, False, ts=time.time(),
                                   state="refused"))  # fmt: skip
    assert [r["state"] for r in store.ledger_entries("k")] == ["refused"]


def _admit_many(state_dir: str, cap: int, n: int, out: multiprocessing.Queue) -> None:
    s = InferenceStore(Path(state_dir))
    budget = Budget("k", daily_tokens=cap)
    granted = 0
    a = b.Ask(40, 60)
    for i in range(n):

        def decide(settled: Spend, reserved: Spend, i: int = i) -> Reservation | None:
            g = b.grant(budget, settled, reserved, a, time.time())
            if not g.admitted:
                return None
            return Reservation(f"{multiprocessing.current_process().pid}-{i}", "k", "m", False,
                               40, g.completion_tokens, 0.0, time.time(), "x:1")  # fmt: skip

        if s.reserve("k", time.time(), decide) is not None:
            granted += 1
    out.put(granted)
    s.close()


def test_reservations_are_atomic_across_processes(tmp_path: Path) -> None:
    """6 processes x 40 admissions against one 5,000-token day: the open reservations never
    pass the cap (a read-then-write race would let several processes take the same room)."""
    InferenceStore(tmp_path).close()
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue = ctx.Queue()
    procs = [ctx.Process(target=_admit_many, args=(str(tmp_path), 5000, 40, out)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    granted = sum(out.get(timeout=5) for _ in procs)
    with InferenceStore(tmp_path) as s:
        rows = s.ledger_entries("k")
        assert len(rows) == granted > 0
        assert sum(r["reserved_tokens"] for r in rows) <= 5000
        assert s.reserved("k").day_tokens <= 5000


# -- migration and owners ------------------------------------------------------------------


def test_migration_keeps_old_rows_settled(tmp_path: Path) -> None:
    path = tmp_path / DB_NAME
    conn = sqlite3.connect(path, isolation_level=None)
    for version, (_name, sql) in enumerate(MIGRATIONS[:5], start=1):
        conn.executescript(f"BEGIN;\n{sql}\nPRAGMA user_version = {version};\nCOMMIT;")
    conn.executemany(
        "INSERT INTO usage_ledger (ts, key_id, model, prompt_tokens, completion_tokens, "
        "latency_s, status, stream, cost) VALUES (?, 'k', 'm', 1, 2, 0.1, ?, 0, 0)",
        [(time.time(), 200), (time.time(), 502)],
    )
    conn.close()
    with open_store(tmp_path) as store:
        assert store.schema_version == len(MIGRATIONS)
    with InferenceStore(tmp_path) as s:
        assert [r["state"] for r in s.ledger_entries("k")] == ["ok", "error"]
        assert s.reserved("k") == Spend()
        assert s.list_keys() == []


def test_owner_tokens() -> None:
    mine = process_token()
    assert owner_alive(mine)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    token = process_token(child.pid)
    child.wait()
    assert token and not owner_alive(token)  # exited
    here, _, start = mine.rpartition(":")
    assert not owner_alive(f"{here}:{int(start) + 1}")  # a reused pid is another process
    assert not owner_alive("") and not owner_alive("garbage")


def test_owner_tokens_name_the_boot_and_the_pid_namespace() -> None:
    """Gateways in other pid namespaces (containers) may share the store: their rows are left
    alone, whatever pid they name here; rows of an earlier boot are settled."""
    import os
    import uuid
    from pathlib import Path

    mine = process_token()
    boot, ns, pid, start = mine.split(":")
    assert boot == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert int(ns) == os.stat("/proc/self/ns/pid").st_ino
    assert pid == str(os.getpid())
    elsewhere = f"{boot}:{int(ns) + 1}"
    assert owner_alive(f"{elsewhere}:{pid}:{start}")  # our pid number, another namespace's
    assert owner_alive(f"{elsewhere}:4194304:1")  # no such pid here: still not ours to judge
    assert not owner_alive(f"{uuid.uuid4()}:{ns}:{pid}:{start}")  # an earlier boot: all gone
    assert not owner_alive(f"{uuid.uuid4()}:{int(ns) + 1}:{pid}:{start}")
    assert not owner_alive(f"{boot}:{ns}:{pid}:{int(start) + 1}")  # here, and gone
    assert owner_alive(f"{pid}:{start}")  # a row written before tokens named the boot
