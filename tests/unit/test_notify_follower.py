"""Following the audit log (appliance/control/notify/follower.py) with the real chain writer:
new records once and in order, a line still being written waits, and tampering is reported."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.audit import ChainWriter, audit_path
from appliance.control.notify import follower as follower_module
from appliance.control.notify.follower import AuditFollower


class Seen:
    def __init__(self, path: Path) -> None:
        self.records: list[dict[str, Any]] = []
        self.tampers: list[tuple[str, str]] = []
        self.follower = AuditFollower(path, self.records.append, self.on_tamper)

    def on_tamper(self, kind: str, detail: str) -> None:
        self.tampers.append((kind, detail))

    def events(self) -> list[str]:
        return [r["event"] for r in self.records]


def setup(tmp_path: Path) -> tuple[ChainWriter, Path]:
    path = audit_path(tmp_path / "state")
    return ChainWriter(path), path


def test_starts_at_the_end_and_sees_each_append_once_in_order(tmp_path: Path) -> None:
    writer, path = setup(tmp_path)
    writer.append("before.start")
    seen = Seen(path)
    seen.follower.start_at_end()
    assert seen.follower.poll() == 0
    writer.append("one", n=1)
    writer.append_many([("two", {}), ("notify.delivered", {"hook": "h"})])
    assert seen.follower.poll() == 3
    assert seen.follower.poll() == 0
    assert seen.events() == ["one", "two", "notify.delivered"]
    assert seen.tampers == []


def test_a_log_created_after_the_start_is_read_from_its_first_record(tmp_path: Path) -> None:
    writer, path = setup(tmp_path)
    seen = Seen(path)
    seen.follower.start_at_end()
    assert seen.follower.poll() == 0  # no file yet: not an error
    writer.append("first")
    writer.append("second")
    seen.follower.poll()
    assert seen.events() == ["first", "second"] and seen.tampers == []


def test_a_partial_last_line_waits_for_its_newline(tmp_path: Path) -> None:
    writer, path = setup(tmp_path)
    writer.append("start")
    seen = Seen(path)
    seen.follower.start_at_end()
    line = json.dumps(
        {"seq": 2, "ts": "t", "event": "late", "prev": "0" * 64, "hash": "1" * 64}
    ).encode()
    with path.open("ab") as f:  # a writer's line half-way in (not through ChainWriter)
        f.write(line[:20])
    assert seen.follower.poll() == 0
    with path.open("ab") as f:
        f.write(line[20:] + b"\n")
    assert seen.follower.poll() == 1
    assert seen.events() == ["late"]


def test_a_torn_line_at_start_is_not_taken_as_whole(tmp_path: Path) -> None:
    writer, path = setup(tmp_path)
    writer.append("start")
    with path.open("ab") as f:
        f.write(b'{"seq": 2, "torn')
    seen = Seen(path)
    seen.follower.start_at_end()
    assert seen.follower.offset < path.stat().st_size


def test_a_record_that_does_not_link_is_tamper(tmp_path: Path) -> None:
    writer, path = setup(tmp_path)
    writer.append("a")
    seen = Seen(path)
    seen.follower.start_at_end()
    # Someone rewrites the log: the new lines chain among themselves, not to what was seen.
    other = ChainWriter(tmp_path / "elsewhere" / "audit.jsonl")
    other.append("x")
    forged = other.append("forged")
    with path.open("ab") as f:
        f.write(json.dumps(forged).encode() + b"\n")
    seen.follower.poll()
    assert seen.tampers and seen.tampers[0][0] == "chain"
    assert "does not link" in seen.tampers[0][1]
    assert seen.events() == ["forged"]  # still passed on: the evidence is not swallowed


def test_an_edited_record_is_tamper(tmp_path: Path) -> None:
    writer, path = setup(tmp_path)
    writer.append("a")
    seen = Seen(path)
    seen.follower.start_at_end()
    rec = writer.append("budget.warning", percent=80)
    size_before = path.stat().st_size
    data = path.read_bytes().replace(b'"percent":80', b'"percent":10')
    path.write_bytes(data)  # same inode, same size: an in-place edit of a line not read yet
    assert path.stat().st_size == size_before and rec["seq"] == 2
    seen.follower.poll()
    assert [k for k, _ in seen.tampers] == ["edited"]


def test_a_shrunk_log_is_tamper_then_followed_from_its_new_end(tmp_path: Path) -> None:
    writer, path = setup(tmp_path)
    for i in range(3):
        writer.append("a", i=i)
    seen = Seen(path)
    seen.follower.start_at_end()
    lines = path.read_bytes().splitlines(keepends=True)
    with path.open("r+b") as f:
        f.truncate(len(b"".join(lines[:1])))
    seen.follower.poll()
    assert [k for k, _ in seen.tampers] == ["truncated"]
    assert "shrank" in seen.tampers[0][1]
    writer.append("after")  # the writer records the cut itself (audit.anomaly) then this
    seen.follower.poll()
    assert seen.events() == ["audit.anomaly", "after"]
    assert len(seen.tampers) == 1  # the new end is linked to: no second report


def test_a_replaced_or_removed_log_is_tamper(tmp_path: Path) -> None:
    writer, path = setup(tmp_path)
    writer.append("a")
    seen = Seen(path)
    seen.follower.start_at_end()
    replacement = path.with_name("new.jsonl")
    replacement.write_bytes(path.read_bytes())
    os.replace(replacement, path)
    seen.follower.poll()
    assert [k for k, _ in seen.tampers] == ["replaced"]
    path.unlink()
    seen.follower.poll()
    assert [k for k, _ in seen.tampers] == ["replaced", "replaced"]
    assert "removed" in seen.tampers[1][1]


def test_run_follows_concurrent_writers_until_stopped(tmp_path: Path) -> None:
    writer, path = setup(tmp_path)
    writer.append("start")
    seen = Seen(path)
    stop = threading.Event()
    thread = threading.Thread(target=seen.follower.run, args=(stop, 0.01))
    thread.start()
    assert seen.follower.started.wait(5)  # it starts at the end: "start" is not new

    def write(tag: str) -> None:
        w = ChainWriter(path)  # each thread its own writer, as processes would have
        for i in range(25):
            w.append(tag, i=i)

    writers = [threading.Thread(target=write, args=(f"w{n}",)) for n in range(4)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    deadline = time.monotonic() + 5
    while len(seen.records) < 100 and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    thread.join(2)
    assert not thread.is_alive()
    assert len(seen.records) == 100 and seen.tampers == []
    assert [r["seq"] for r in seen.records] == list(range(2, 102))


def test_a_record_appended_while_starting_is_neither_missed_nor_tamper(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer, path = setup(tmp_path)
    writer.append("before")
    find_end = follower_module._after_last_newline

    def then_another_writer_appends(fd: int, size: int) -> int:
        offset = find_end(fd, size)
        writer.append("during.start")  # between finding the end and reading the last record
        return offset

    monkeypatch.setattr(follower_module, "_after_last_newline", then_another_writer_appends)
    seen = Seen(path)
    seen.follower.start_at_end()
    monkeypatch.undo()
    seen.follower.poll()
    assert seen.tampers == []
    assert seen.events() == ["during.start"]


def test_an_error_while_starting_is_retried_logged_once_and_the_thread_lives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    writer, path = setup(tmp_path)
    writer.append("start")
    seen = Seen(path)
    position = seen.follower.start_at_end
    calls: list[int] = []

    def flaky() -> None:
        calls.append(1)
        if len(calls) <= 3:
            raise OSError(5, "Input/output error")
        position()

    monkeypatch.setattr(seen.follower, "start_at_end", flaky)
    stop = threading.Event()
    thread = threading.Thread(target=seen.follower.run, args=(stop, 0.01))
    with caplog.at_level("ERROR", logger=follower_module.__name__):
        thread.start()
        try:
            assert seen.follower.started.wait(5) and thread.is_alive()
            writer.append("after")
            deadline = time.monotonic() + 5
            while not seen.records and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            stop.set()
            thread.join(2)
    assert seen.events() == ["after"] and len(calls) == 4
    assert len([r for r in caplog.records if r.levelname == "ERROR"]) == 1
