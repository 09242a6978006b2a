"""Appending to the chain: ChainWriter (any number of processes at once, serialised on a flock)
and BackgroundAudit (batched appends on a thread, for callers on an event loop)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import queue
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.audit.logfile import Head, head_or_bad, lines_backwards, write_head
from appliance.audit.records import (
    ANOMALY,
    GENESIS,
    Entry,
    head_path,
    now_iso,
    parse_record,
    record_fields,
    record_hash,
    record_line,
)
from appliance.errors import StateError


@dataclass
class _Tail:
    last: dict[str, Any] | None  # the last record that parses
    torn: bool  # the file does not end with a newline
    skipped: int  # unparseable lines after `last`, a torn fragment included


def _read_tail(fd: int, size: int) -> _Tail:
    if size == 0:
        return _Tail(None, False, 0)
    torn = os.pread(fd, 1, size - 1) != b"\n"
    lines = lines_backwards(fd, size)
    if not torn:
        next(lines)  # the empty text after the final newline
    skipped = 0
    for raw in lines:
        rec = parse_record(raw)
        if rec is not None:
            return _Tail(rec, torn, skipped)
        skipped += 1
    return _Tail(None, torn, skipped)


def _anomalies(tail: _Tail, head: Head | str | None, size: int) -> list[dict[str, Any]]:
    """What this writer must record before its own records, or the evidence would be lost."""
    found = [_tail_anomaly(tail)] if tail.skipped else []
    problem = _head_anomaly(tail, head, size)
    return [*found, problem] if problem else found


def _tail_anomaly(tail: _Tail) -> dict[str, Any]:
    last_seq = tail.last["seq"] if tail.last else 0
    torn = tail.torn and tail.skipped == 1  # only a torn fragment, as a crash mid-write leaves
    what = "a partial last line" if torn else f"{tail.skipped} unreadable line(s)"
    return {
        "kind": "truncated" if torn else "corrupt",
        "detail": f"{what} after seq {last_seq}",
        "after_seq": last_seq,
    }


def _head_anomaly(tail: _Tail, head: Head | str | None, size: int) -> dict[str, Any] | None:
    last_seq = tail.last["seq"] if tail.last else 0
    if isinstance(head, str):
        return {"kind": "anchor", "detail": f"the head file is {head}"}
    if head is None:
        return {"kind": "anchor", "detail": "the head file is missing"} if size else None
    if head.seq > last_seq:  # whole records were cut off the end
        detail = f"the head records seq {head.seq} but the log ends at seq {last_seq}"
    elif tail.last and head.seq == last_seq and head.hash != tail.last["hash"]:
        detail = f"seq {last_seq}, the last record, does not match the head's hash"
    else:
        return None  # in step, or lagging after a crash (the head is not fsynced)
    kind = "truncated" if head.seq > last_seq else "edited"
    return {"kind": kind, "detail": detail, "head_seq": head.seq, "head_hash": head.hash}


class ChainWriter:
    """Appends to one chain file. Holds no state between appends, so any number of instances,
    threads and processes can append to the same file at once."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.head = head_path(self.path)
        self._prepared = False

    def audit(self, event: str, **fields: Any) -> None:
        """The AuditSink Protocols that `inference` and `sandbox` declare."""
        self.append(event, **fields)

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        return self.append_many([(event, fields)])[-1]

    def append_many(self, entries: Sequence[Entry]) -> list[dict[str, Any]]:
        """Append the entries as consecutive records (one lock, one write, one fdatasync)."""
        if not entries:
            return []
        try:
            fd = self._open()
        except OSError as exc:
            raise StateError(f"{self.path}: cannot open the audit log: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return self._append_locked(fd, entries)
        except OSError as exc:
            raise StateError(f"{self.path}: cannot append to the audit log: {exc}") from None
        finally:
            os.close(fd)  # also releases the lock

    def _open(self) -> int:
        if not self._prepared:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with contextlib.suppress(PermissionError):
                if self.path.parent.stat().st_mode & 0o077:
                    self.path.parent.chmod(0o700)
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(self.path, flags, 0o600)
        if not self._prepared:
            with contextlib.suppress(PermissionError):
                if os.fstat(fd).st_mode & 0o077:
                    os.fchmod(fd, 0o600)
            self._prepared = True
        return fd

    def _append_locked(self, fd: int, entries: Sequence[Entry]) -> list[dict[str, Any]]:
        size = os.fstat(fd).st_size
        tail = _read_tail(fd, size)
        head = head_or_bad(self.head)
        if head is None and size == 0:
            write_head(self.head, Head(0, GENESIS), sync=True)  # so a missing head means tamper
        anomalies = [(ANOMALY, a) for a in _anomalies(tail, head, size)]
        seq = tail.last["seq"] if tail.last else 0
        prev = tail.last["hash"] if tail.last else GENESIS
        records = []
        for event, fields in [*anomalies, *entries]:
            seq += 1
            rec = {"seq": seq, "ts": now_iso(), "event": str(event), **record_fields(fields)}
            rec["prev"] = prev
            rec["hash"] = prev = record_hash(rec)
            records.append(rec)
        data = (b"\n" if tail.torn else b"") + b"".join(record_line(r) for r in records)
        while data:  # a regular file takes it whole; loop anyway rather than lose a tail
            data = data[os.write(fd, data) :]
        os.fdatasync(fd)
        write_head(self.head, Head(seq, prev))
        return records[len(anomalies) :]


_STOP = object()


class BackgroundAudit:
    """An AuditSink whose appends happen on a writer thread, batched: callers on an event loop
    (the egress proxy) never wait for the lock or the disk. What is still queued when the
    process dies is lost; close() flushes."""

    def __init__(self, writer: ChainWriter, batch: int = 256) -> None:
        self.writer = writer
        self._batch = batch
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def audit(self, event: str, **fields: Any) -> None:
        self._queue.put((event, fields))

    def close(self, timeout: float = 5.0) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        stop = False
        while not stop:
            items = [self._queue.get()]
            with contextlib.suppress(queue.Empty):
                while len(items) < self._batch:
                    items.append(self._queue.get_nowait())
            stop = _STOP in items
            entries = [i for i in items if i is not _STOP]
            try:
                self.writer.append_many(entries)
            except Exception as exc:  # keep serving; say what was lost where the host can see it
                sys.stderr.write(f"audit: {exc}: {len(entries)} record(s) not written\n")
