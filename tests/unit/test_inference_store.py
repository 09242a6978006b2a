"""The inference store: hashed keys, revocation, the ledger's day/month windows, budgets, audit."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from appliance.store import open_store
from appliance.store.inference_store import (
    SECRET_PREFIX,
    InferenceStore,
    KeyModelError,
)
from appliance.store.migrations import MIGRATIONS
from appliance.store.names import KeyExistsError, KeyNameError
from inference.ports import Budget, UsageRecord


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@pytest.fixture
def store(tmp_path: Path) -> InferenceStore:
    with InferenceStore(tmp_path) as s:
        yield s


def usage(key_id: str, when: float, prompt: int = 10, completion: int = 5, cost: float = 0.0):
    return UsageRecord(key_id, "nemotron", prompt, completion, 0.1, 200, False, cost, when)


def test_secret_is_shown_once_and_stored_only_as_sha256(store: InferenceStore) -> None:
    key, secret = store.create_key("laptop", "client")
    assert secret.startswith(SECRET_PREFIX) and len(secret) >= len(SECRET_PREFIX) + 43
    assert key.id.startswith("key_") and key.name == "laptop" and key.owner_kind == "client"
    dump = "\n".join(store.conn.iterdump())
    assert secret not in dump and secret[len(SECRET_PREFIX) :] not in dump
    assert hashlib.sha256(secret.encode()).hexdigest() in dump
    assert store.authenticate(secret) == key
    assert store.authenticate(secret + "x") is None
    assert store.authenticate("not-ours") is None


def test_secrets_are_unique(store: InferenceStore) -> None:
    secrets = {store.create_key(f"k{i}", "sandbox")[1] for i in range(20)}
    assert len(secrets) == 20


def test_revoke_by_name_or_id_stops_authentication(store: InferenceStore) -> None:
    _, sa = store.create_key("a", "client")
    b, sb = store.create_key("b", "sandbox")
    assert store.authenticate(sa) and store.authenticate(sb)  # both cached now
    assert store.revoke_key("a") is not None
    revoked = store.revoke_key(b.id)
    assert revoked is not None and revoked.revoked_at is not None
    assert store.authenticate(sa) is None and store.authenticate(sb) is None
    assert store.revoke_key("a") is None  # already revoked: nothing live by that name
    assert [k.revoked_at is not None for k in store.list_keys()] == [True, True]
    assert store.list_keys(include_revoked=False) == []
    events = [e["event"] for e in store.audit_events("key.")]
    assert events == ["key.created", "key.created", "key.revoked", "key.revoked"]


def test_revoke_from_another_process_applies_after_the_cache_ttl(tmp_path: Path) -> None:
    gateway = InferenceStore(tmp_path, auth_cache_ttl_s=0.2)
    cli = InferenceStore(tmp_path)
    _, secret = cli.create_key("agent", "sandbox")
    assert gateway.authenticate(secret) is not None
    cli.revoke_key("agent")
    time.sleep(0.25)
    assert gateway.authenticate(secret) is None


def test_live_names_are_unique_but_reusable_after_revoke(store: InferenceStore) -> None:
    store.create_key("dup", "client")
    with pytest.raises(KeyExistsError, match="already exists"):
        store.create_key("dup", "client")
    store.revoke_key("dup")
    key, _ = store.create_key("dup", "client")
    assert store.find_key("dup") == key


@pytest.mark.parametrize("name", ["", "has space", "key_lookslikeanid", "x" * 65, "-lead"])
def test_bad_key_names_are_refused(store: InferenceStore, name: str) -> None:
    with pytest.raises(KeyNameError):
        store.create_key(name, "client")


def test_spend_sums_the_utc_day_and_month(store: InferenceStore) -> None:
    now = ts("2026-03-15T12:00:00")
    store.record_usages(
        [
            usage("k", ts("2026-03-15T00:00:00"), 100, 50, 0.5),  # today, first second
            usage("k", ts("2026-03-15T11:59:59"), 10, 5, 0.25),  # today
            usage("k", ts("2026-03-14T23:59:59"), 1000, 0, 1.0),  # yesterday, same month
            usage("k", ts("2026-03-01T00:00:00"), 7, 0, 0.0),  # first of the month
            usage("k", ts("2026-02-28T23:59:59"), 99999, 0, 9.0),  # last month: not counted
            usage("other", ts("2026-03-15T10:00:00"), 5000, 0, 3.0),  # another key
        ]
    )
    spend = store.spend("k", now)
    assert spend.day_tokens == 165 and spend.day_cost == pytest.approx(0.75)
    assert spend.month_tokens == 1172 and spend.month_cost == pytest.approx(1.75)
    assert store.spend("k", ts("2026-04-01T00:00:00")).month_tokens == 0
    assert store.spend("nobody", now).day_tokens == 0


def test_december_rolls_into_january(store: InferenceStore) -> None:
    store.record_usage(usage("k", ts("2026-12-31T23:00:00"), 10, 0))
    assert store.spend("k", ts("2026-12-31T23:30:00")).month_tokens == 10
    assert store.spend("k", ts("2027-01-01T00:00:01")).month_tokens == 0


def test_ledger_rows_and_daily_rollup_agree(store: InferenceStore) -> None:
    now = time.time()
    rows = [usage("k", now, i, 2 * i, 0.001 * i) for i in range(50)]
    store.record_usages(rows[:20])
    for row in rows[20:]:
        store.record_usage(row)
    totals = store.usage_totals("k")
    assert totals["requests"] == 50
    assert totals["prompt_tokens"] == sum(range(50))
    assert totals["completion_tokens"] == 2 * sum(range(50))
    assert store.spend("k", now).day_tokens == 3 * sum(range(50))
    assert store.usage_rows("k")[3] == replace(rows[3], state="ok")  # state: from the status


def test_writes_from_many_threads(store: InferenceStore) -> None:
    def write() -> None:
        for _ in range(20):
            store.record_usage(usage("k", time.time(), 1, 1))

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.usage_totals("k")["requests"] == 80


def test_budgets_set_update_clear(store: InferenceStore) -> None:
    key, _ = store.create_key("b", "client")
    assert store.get_budget(key.id) is None
    store.set_budget(Budget(key.id, daily_tokens=1000, monthly_cost=5.0))
    assert store.get_budget(key.id) == Budget(key.id, 1000, None, None, 5.0)
    store.set_budget(Budget(key.id, monthly_tokens=9))
    assert store.get_budget(key.id) == Budget(key.id, monthly_tokens=9)
    store.set_budget(Budget(key.id))  # no limit at all: removed
    assert store.get_budget(key.id) is None
    assert [e["event"] for e in store.audit_events("budget.")] == ["budget.set"] * 3


def test_budget_needs_an_existing_key(store: InferenceStore) -> None:
    with pytest.raises(sqlite3.IntegrityError):
        store.set_budget(Budget("key_missing", daily_tokens=1))


def test_budget_marks_fire_once_per_period(store: InferenceStore) -> None:
    assert store.mark_budget_event("k", "daily_tokens", "warning", "2026-03-15")
    assert not store.mark_budget_event("k", "daily_tokens", "warning", "2026-03-15")
    assert store.mark_budget_event("k", "daily_tokens", "warning", "2026-03-16")
    assert store.mark_budget_event("k", "daily_tokens", "exceeded", "2026-03-16")
    assert store.mark_budget_event("k2", "daily_tokens", "warning", "2026-03-16")


def test_audit_keeps_fields(store: InferenceStore) -> None:
    store.audit("budget.warning", key_id="key_1", budget="daily_tokens", percent=83)
    (event,) = store.audit_events("budget.warning")
    assert event["key_id"] == "key_1" and event["percent"] == 83


def test_migration_is_appended_and_applies_on_an_old_store(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "appliance.db")  # a store at schema v1, as shipped
    conn.executescript(MIGRATIONS[0][1] + "\nPRAGMA user_version = 1;")
    conn.execute("INSERT INTO meta VALUES ('k', 'v')")
    conn.commit()
    conn.close()
    with open_store(tmp_path) as s:
        assert s.schema_version == len(MIGRATIONS)
        assert s.conn.execute("SELECT value FROM meta").fetchone() == ("v",)
    InferenceStore(tmp_path).create_key("after-upgrade", "client")


def test_model_allowlist_round_trips_and_rides_in_the_auth_cache(tmp_path: Path) -> None:
    with InferenceStore(tmp_path) as store:
        key, secret = store.create_key("agent", "sandbox", ["smol", "default", "smol"])
        _, open_secret = store.create_key("laptop", "client")
        _, none_secret = store.create_key("locked", "client", [])
        assert key.allowed_models == ("default", "smol")  # sorted, no repeats
        assert store.authenticate(secret) == key
        assert store.authenticate(secret) == key  # the cached record carries it too
        assert store.authenticate(open_secret).allowed_models is None  # None: any model
        assert store.authenticate(none_secret).allowed_models == ()  # empty: none at all
        [created] = [e for e in store.audit_events("key.created") if e["key_id"] == key.id]
        assert created["allowed_models"] == ["default", "smol"]
    with InferenceStore(tmp_path) as other:  # a fresh connection reads it back from the row
        assert other.authenticate(secret).allowed_models == ("default", "smol")
        assert other.find_key("agent").allowed_models == ("default", "smol")
        assert [k.allowed_models for k in other.list_keys()] == [("default", "smol"), None, ()]
        revoked = other.revoke_key("agent")
        assert revoked is not None and revoked.allowed_models == ("default", "smol")


@pytest.mark.parametrize("model", ["", "two words", "x" * 257, "tab\there"])
def test_bad_model_names_are_refused(store: InferenceStore, model: str) -> None:
    with pytest.raises(KeyModelError, match="invalid model name"):
        store.create_key("agent", "sandbox", ["default", model])
    assert store.find_key("agent") is None


def test_allowlist_migration_keeps_old_keys_unrestricted(tmp_path: Path) -> None:
    """A store at the schema just before the allowlist, with a live key and its usage: after
    the upgrade the key still authenticates, may use any model, and its ledger is intact."""
    version = next(i for i, (_, sql) in enumerate(MIGRATIONS) if "allowed_models_json" in sql)
    conn = sqlite3.connect(tmp_path / "appliance.db")
    conn.executescript(
        "\n".join(sql for _, sql in MIGRATIONS[:version]) + f"\nPRAGMA user_version = {version};"
    )
    secret = SECRET_PREFIX + "old-key"
    conn.execute(
        "INSERT INTO api_keys (id, name, owner_kind, secret_sha256, created_at) "
        "VALUES ('key_old', 'old', 'client', ?, 1.0)",
        (hashlib.sha256(secret.encode()).hexdigest(),),
    )
    conn.execute(
        "INSERT INTO usage_ledger (ts, key_id, model, prompt_tokens, completion_tokens, "
        "latency_s, status, stream, cost) VALUES (2.0, 'key_old', 'nemotron', 3, 4, 0.1, 200, 0, 0)"
    )
    conn.commit()
    conn.close()
    with open_store(tmp_path) as s:
        assert s.schema_version == len(MIGRATIONS)
    with InferenceStore(tmp_path) as store:
        old = store.authenticate(secret)
        assert old is not None and (old.id, old.name) == ("key_old", "old")
        assert old.allowed_models is None
        assert store.usage_totals("key_old")["completion_tokens"] == 4
        new, _ = store.create_key("new", "sandbox", ["default"])
        assert store.find_key(new.id).allowed_models == ("default",)
