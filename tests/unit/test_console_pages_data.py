"""The console pages' data, pure: spend per key and per agent per day from usage_daily rows (and
its formula-safe CSV), audit filters from a hostile query string, and agent summaries from the
services' answers."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from appliance.audit import ChainWriter, audit_path
from appliance.console import agents_data, audit_data
from appliance.control.transcript import TranscriptLog
from appliance.ops import spend as spend_data
from appliance.store.inference_store import InferenceStore
from inference.ports import KeyRecord, UsageRecord

NOW = 1796688000.0  # 2026-12-08 00:00:00 UTC


def _key(key_id: str, name: str, kind: str = "client", revoked: bool = False) -> KeyRecord:
    return KeyRecord(key_id, name, kind, 0.0, 1.0 if revoked else None)


# -- spend ------------------------------------------------------------------------------------


def test_the_last_30_days_end_today() -> None:
    days = spend_data.day_range(NOW)
    assert len(days) == 30 and days[-1] == "2026-12-08" and days[0] == "2026-11-09"


def test_spend_per_key_and_per_agent_per_day() -> None:
    keys = [
        _key("k1", "sandbox-bot", "sandbox"),
        _key("k2", "ci"),
        _key("k3", "sandbox-plain", "sandbox"),  # a sandbox that is no agent
        _key("k4", "sandbox-old", "sandbox", revoked=True),  # its past spend still counts
    ]
    labels = spend_data.key_labels(keys, ["bot", "old"])
    days = spend_data.day_range(NOW, 3)
    usage = [
        ("k1", "2026-12-06", 100, 20, 0.5, 2),
        ("k1", "2026-12-08", 10, 5, 0.0, 1),
        ("k2", "2026-12-08", 1, 1, 0.25, 1),
        ("k3", "2026-12-07", 7, 0, 0.0, 1),
        ("k4", "2026-12-07", 3, 3, 0.0, 1),
        ("gone", "2026-12-07", 2, 0, 0.0, 1),  # a key no longer in the store
        ("k2", "2026-11-01", 999, 999, 9.0, 9),  # outside the window
    ]
    report = spend_data.build_report(days, usage, labels)
    assert report.tokens_by_key() == {
        "sandbox-bot": (120, 0, 15),
        "ci": (0, 0, 2),
        "sandbox-plain": (0, 7, 0),
        "sandbox-old": (0, 6, 0),
        "gone": (0, 2, 0),
    }
    assert report.tokens_by_agent() == {
        "bot": (120, 0, 15),
        "old": (0, 6, 0),
    }
    assert report.cost_by_key()["ci"] == (0, 0, 0.25)
    assert report.totals()["tokens"] == 120 + 15 + 2 + 7 + 6 + 2
    assert report.totals()["requests"] == 7


def test_gather_reads_the_daily_rollup(tmp_path: Path) -> None:
    with InferenceStore(tmp_path) as store:
        key, _ = store.create_key("sandbox-bot", "sandbox")
        store.record_usage(UsageRecord(key.id, "m", 40, 2, 0.1, 200, False, 0.5, NOW - 86400))
        store.record_usage(UsageRecord(key.id, "m", 1, 1, 0.1, 200, False, 0.0, NOW + 60))
        report = spend_data.gather(store, ["bot"], NOW + 120)
    assert [(r.day, r.tokens) for r in report.rows] == [("2026-12-07", 42), ("2026-12-08", 2)]
    assert report.rows[0].key.agent == "bot"


@pytest.mark.parametrize("text", ["=cmd|' /C calc'!A0", "+1", "-1+1", "@SUM(A1)", "\tx", "\rx"])
def test_csv_cells_that_a_spreadsheet_would_run_get_a_quote(text: str) -> None:
    assert spend_data.safe_cell(text) == "'" + text
    label = spend_data.KeyLabel("id", text, "client", text, False)
    report = spend_data.SpendReport(
        ["2026-12-08"], [spend_data.SpendRow("2026-12-08", label, 1, 2, 0.5, 1)]
    )
    [header, row] = list(csv.reader(io.StringIO(spend_data.to_csv(report))))
    assert header == list(spend_data.CSV_COLUMNS)
    assert row[1] == "'" + text and row[4] == "'" + text
    assert row[5:] == ["1", "2", "3", "0.500000", "1"]


def test_plain_cells_are_left_alone() -> None:
    assert spend_data.safe_cell("sandbox-bot") == "sandbox-bot"
    assert spend_data.safe_cell(None) == ""


# -- audit ------------------------------------------------------------------------------------


def test_filters_from_a_hostile_query_string() -> None:
    wanted, errors = audit_data.parse_filter(
        {"event": "x" * 5000, "actor": "a\x00b", "sandbox": "<script>", "limit": "1e9"}
    )
    assert len(errors) == 3
    assert "at most 200 characters" in errors[0] and "control characters" in errors[1]
    assert "limit" in errors[2]
    # The bad ones are left out, the good one kept as plain text.
    assert (wanted.event, wanted.actor, wanted.sandbox) == ("", "", "<script>")
    assert wanted.limit == audit_data.LIMIT_DEFAULT
    assert audit_data.parse_filter({"limit": "0"})[0].limit == 1
    assert audit_data.parse_filter({"limit": "999999"})[0].limit == audit_data.LIMIT_MAX
    assert audit_data.parse_filter({"limit": "٣"})[1]  # a digit, but not an ASCII one


def test_a_filter_matches_by_prefix_actor_sandbox_and_text() -> None:
    kill = {"event": "control.kill", "actor": "alice", "sandboxes": ["a", "b"]}
    held = {"event": "egress.held", "sandbox": "b", "host": "Evil.Example"}
    f = audit_data.AuditFilter
    assert f(event="control.").matches(kill) and not f(event="control.").matches(held)
    assert f(event="egress.*").matches(held) is False  # a prefix, never a pattern
    assert f(actor="alice").matches(kill) and not f(actor="ali").matches(kill)
    assert f(sandbox="b").matches(kill) and f(sandbox="b").matches(held)
    assert not f(sandbox="c").matches(kill)
    assert f(text="evil.example").matches(held) and not f(text="nothing").matches(held)


def test_tail_is_newest_first_and_verify_is_cached_until_the_log_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = audit_path(tmp_path)
    writer = ChainWriter(path)
    for i in range(5):
        writer.append("test.event", n=i, actor="alice" if i % 2 else "bob")
    got = audit_data.tail(path, audit_data.AuditFilter(actor="alice", limit=10))
    assert [r["n"] for r in got] == [3, 1]
    cache = audit_data.VerifyCache()
    calls = []
    real = audit_data.verify
    monkeypatch.setattr(audit_data, "verify", lambda p: calls.append(p) or real(p))
    first = cache.verification(path)
    assert first["ok"] and first["records"] == 5
    assert cache.verification(path) is first and len(calls) == 1
    writer.append("test.event", n=5)
    assert cache.verification(path)["records"] == 6 and len(calls) == 2


# -- agents -----------------------------------------------------------------------------------


def test_an_agent_summary() -> None:
    row = {
        "name": "bot", "blueprint": "helper@1.2.0", "state": "running", "since": NOW - 90061,
        "turns": 4, "last_activity": NOW - 5, "runtime": {"state": "running"},
    }  # fmt: skip
    report = {
        "key": "sandbox-bot",
        "spend": {"day_tokens": 900, "month_tokens": 2000},
        "limits": [
            {"budget": "monthly_tokens", "used": 2000, "limit": 10000},
            {"budget": "daily_tokens", "used": 900, "limit": 1000},
        ],
    }
    transcript = [
        {"ts": NOW - 60, "ok": True, "message": "m1", "reply": "r1", "tokens": {"total": 12}},
        {"ts": NOW - 30, "ok": False, "refused": "the kill switch holds"},
        {"ts": NOW - 10, "ok": False, "cancelled": True, "error": "stopped"},
        {"ts": NOW - 5, "ok": False, "error": "exit 3", "trigger": "schedule"},
    ]
    schedule = agents_data.schedule_line(
        [
            {"next_run_at": NOW + 60, "last_run_at": NOW - 600, "last_outcome": "ok"},
            {"next_run_at": NOW + 30, "last_run_at": NOW - 60, "last_outcome": "failed"},
            {"next_run_at": None, "last_run_at": None},
        ]
    )
    s = agents_data.summary(row, report, schedule, transcript, now=NOW)
    assert (s.blueprint, s.uptime_s, s.runtime) == ("helper@1.2.0", 90061, "running")
    assert s.last_activity == NOW - 5
    assert [(g.label, g.percent) for g in s.gauges] == [
        ("tokens today", 90.0),
        ("tokens this month", 20.0),
    ]
    assert s.gauges[0].text == "900 of 1,000 (90%)" and s.gauges[0].low == 800
    assert s.spend == {"day_tokens": 900, "month_tokens": 2000}
    assert (s.schedule.entries, s.schedule.next_run_at) == (3, NOW + 30)
    assert (s.schedule.last_run_at, s.schedule.last_outcome) == (NOW - 60, "failed")
    assert [t.outcome for t in s.last_turns] == ["failed", "cancelled", "refused"]
    assert s.last_turns[0].trigger == "schedule" and s.last_turns[2].detail.startswith("the kill")


def test_a_stopped_agent_has_no_uptime_and_odd_records_do_not_break_it() -> None:
    s = agents_data.summary(
        {"name": "x", "state": "stopped", "since": NOW}, None, agents_data.ScheduleLine(), [{}]
    )
    assert (s.uptime_s, s.gauges, s.blueprint) == (None, [], "?")
    assert s.last_turns[0].outcome == "failed" and s.last_turns[0].ts is None
    long = agents_data.turn_line({"message": "m" * 20_001, "reply": "r" * 1_000_000})
    assert long.message.endswith("m… [1 more characters in the transcript]")
    assert len(long.reply) < 20_100 and "980,000 more characters" in long.reply
    odd = agents_data.turn_line({"ts": "yesterday", "duration_s": float("nan"), "tokens": [1]})
    assert (odd.ts, odd.duration_s, odd.tokens) == (None, None, None)


def test_only_a_sandboxs_own_key_gives_an_agent_its_budget() -> None:
    reports = [{"key": "sandbox-bot", "key_id": "c1"}, {"key": "sandbox-two", "key_id": "s2"}]
    keys = [{"id": "c1", "owner_kind": "client"}, {"id": "s2", "owner_kind": "sandbox"}]
    assert list(agents_data.budgets_by_agent(reports, keys)) == ["two"]


def test_the_newest_turns_are_read_from_the_transcripts_end(tmp_path: Path) -> None:
    log = TranscriptLog(tmp_path)
    assert log.last("bot", 3) == []  # no transcript yet
    for i in range(6):
        log.append("bot", {"n": i, "reply": "é" * (40_000 * (i % 2))})  # lines across chunks
    assert [t["n"] for t in log.last("bot", 3)] == [3, 4, 5]
    assert [t["n"] for t in log.last("bot", 100)] == list(range(6))
    assert log.last("bot", 3) == log.read("bot")[-3:]
    assert log.last("bot", 0) == []
    with log.path("bot").open("a") as fh:
        fh.write('[1]\n{"n": 6, "rep')  # not a turn; a line cut short by a crash
    assert [t["n"] for t in log.last("bot", 2)] == [4, 5]
