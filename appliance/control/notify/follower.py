"""Following the audit log as it grows: each new record, once, in order; and the signs of
tampering that only a reader who remembers the last record can see.

It starts at the end (what was there before the control plane started was notified then, or
never wanted), taking its place and the last record's hash from one look at the file, and keeps
its place in memory; `started` is set once it is positioned (a failure to position is
retried). A record whose `prev` is not the hash of the record before it (one was inserted,
edited or removed between two polls), a record whose hash does not match its content, the file
shrinking, or the file replaced by another (a new inode): each is reported through
`on_tamper(kind, detail)`, then the follower goes on from the new end. Lines that are not
records are skipped: the next writer records them itself as `audit.anomaly`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.audit import GENESIS, parse_record, record_hash
from appliance.audit.logfile import lines_backwards

log = logging.getLogger(__name__)

CHUNK_LIMIT = 1 << 20  # bytes read per poll; the rest next poll
POLL_EVERY_S = 0.25

OnRecord = Callable[[dict[str, Any]], None]
OnTamper = Callable[[str, str], None]


class AuditFollower:
    def __init__(self, path: Path, on_record: OnRecord, on_tamper: OnTamper) -> None:
        self.path = Path(path)
        self.on_record = on_record
        self.on_tamper = on_tamper
        self.offset = 0
        self.ident: tuple[int, int] | None = None  # (st_dev, st_ino) of the file followed
        self.last_hash: str | None = None  # None: not known, the next record sets it
        self.started = threading.Event()  # set by `run` once positioned at the end

    def start_at_end(self) -> None:
        """Follow from the end of the last complete line, linking to the last record."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # no log yet: its first record must start the chain
            self.ident, self.offset, self.last_hash = None, 0, GENESIS
            return
        try:  # the place and the last hash from the same size of the same file: a record
            st = os.fstat(fd)  # appended meanwhile is after both, read by the next poll
            offset = _after_last_newline(fd, st.st_size)
            last_hash = _last_hash(fd, offset)
        finally:
            os.close(fd)
        self.ident, self.offset, self.last_hash = (st.st_dev, st.st_ino), offset, last_hash

    def poll(self) -> int:
        """Handle what was appended since the last poll; the number of records handled."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            if self.ident is not None:
                self._tamper("replaced", f"{self.path} was removed")
                self.ident, self.offset, self.last_hash = None, 0, GENESIS
            return 0
        try:
            st = os.fstat(fd)
            ident = (st.st_dev, st.st_ino)
            if self.ident is None and self.offset == 0:
                self.ident = ident  # the log was created since: read it from its start
            elif ident != self.ident:
                self._tamper("replaced", f"{self.path} was replaced by another file")
                return self._resync()
            if st.st_size < self.offset:
                detail = f"{self.path} shrank from {self.offset} to {st.st_size} bytes"
                self._tamper("truncated", detail)
                return self._resync()
            if st.st_size == self.offset:
                return 0
            data = os.pread(fd, min(st.st_size - self.offset, CHUNK_LIMIT), self.offset)
        finally:
            os.close(fd)
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits
        if not complete and len(data) == CHUNK_LIMIT:
            complete = data  # one "line" over a MiB is no record: step over it
        self.offset += len(complete)
        handled = 0
        for raw in complete.splitlines():
            rec = parse_record(raw)
            if rec is not None:
                self._check_link(rec)
                self._deliver(rec)
                handled += 1
        return handled

    def run(self, stop: threading.Event, every_s: float = POLL_EVERY_S) -> None:
        last_failure = ""
        while not stop.is_set():
            try:
                if not self.started.is_set():
                    self.start_at_end()
                    self.started.set()
                while self.poll() and not stop.is_set():
                    pass  # more than one chunk behind: catch up before sleeping
                last_failure = ""
            except Exception as exc:  # an unreadable log now must not end notifications for good
                if repr(exc) != last_failure:  # logged once, not four times a second
                    log.exception("following %s failed", self.path)
                last_failure = repr(exc)
            stop.wait(every_s)

    def _check_link(self, rec: dict[str, Any]) -> None:
        seq = rec["seq"]
        if self.last_hash is not None and rec["prev"] != self.last_hash:
            self._tamper("chain", f"seq {seq} does not link to the record before it")
        elif record_hash(rec) != rec["hash"]:
            self._tamper("edited", f"seq {seq}'s hash does not match its content")
        self.last_hash = rec["hash"]

    def _resync(self) -> int:
        self.start_at_end()
        return 0

    def _deliver(self, rec: dict[str, Any]) -> None:
        try:
            self.on_record(rec)
        except Exception:  # one bad record must not stop the records after it
            log.exception("notifying audit record seq %s failed", rec.get("seq"))

    def _tamper(self, kind: str, detail: str) -> None:
        log.error("audit log tampering: %s: %s", kind, detail)
        try:
            self.on_tamper(kind, detail)
        except Exception:
            log.exception("notifying audit tampering failed")


def _last_hash(fd: int, end: int) -> str:
    """The hash of the last record before `end` (GENESIS when there is none)."""
    for raw in lines_backwards(fd, end):
        rec = parse_record(raw)
        if rec is not None:
            return str(rec["hash"])
    return GENESIS


def _after_last_newline(fd: int, size: int) -> int:
    """The offset just past the file's last newline (a torn last line is not read as whole)."""
    pos = size
    while pos > 0:
        n = min(CHUNK_LIMIT, pos)
        chunk = os.pread(fd, n, pos - n)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            return pos - n + newline + 1
        pos -= n
    return 0
