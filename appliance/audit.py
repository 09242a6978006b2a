"""The host's audit log: append-only, hash-chained JSON lines that many processes append to.

    <state_dir>/audit/audit.jsonl   one record a line (file 0600, directory 0700)
    <state_dir>/audit/audit.head    {"seq", "hash"} of the last record: the tail's anchor

A record is {"seq": n, "ts": ISO-8601 UTC, "event": ..., <fields>, "prev": ..., "hash": ...}: hash
is the SHA-256 of the record's canonical JSON without "hash" (sorted keys, no spaces, ASCII), prev
is the previous record's hash, and record 1's prev is 64 zeros. Editing, deleting, inserting or
reordering a line breaks the chain. Cutting whole records off the end does not: that is what the
head file is for.

Writers (the gateway, each egress proxy, CLI commands, the supervisor) serialise on an exclusive
flock of the log. Under it a writer reads the last line by seeking back from the end, writes its
line(s) with one O_APPEND write, fdatasyncs, then rewrites the head in place. A writer that finds
the log and the head disagreeing (records cut off the tail, a line torn by a crash) first appends
an `audit.anomaly` record, so the evidence survives the head being rewritten; `verify` reports it.

Fields named like a credential (key, token, secret, password, authorization...) are redacted, and
so are values that look like one (`sk-...`, `Bearer ...`): the log must never hold a secret.

Standard library only: the egress proxy process imports it (see appliance/egress_main.py).

Limits: a plain hash chain is tamper-evident only against someone who does not recompute it.
Whoever can write both the log and the head can rewrite them consistently, so anchor the head
elsewhere (`appliance audit verify --json` prints it, exports carry it). The head is not fsynced
after each append: after a power loss it may lag the log, which verify accepts. Rotation is out of
scope: the log grows until an operator archives it.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import hashlib
import json
import math
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.errors import StateError

GENESIS = "0" * 64
AUDIT_DIR = "audit"
LOG_NAME = "audit.jsonl"
HEAD_SIZE = 160  # the head is rewritten in place at a fixed size: one small pwrite, no truncate
ANOMALY = "audit.anomaly"
REDACTED = "[redacted]"
RESERVED = frozenset({"seq", "ts", "event", "prev", "hash"})
CHUNK = 1 << 16
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

Entry = tuple[str, Mapping[str, Any]]  # (event, fields)


class TamperError(StateError):
    """The audit log failed verification: a record was edited, deleted, inserted, reordered or
    cut off."""

    hint = (
        "keep the file as evidence; `appliance audit verify --json` lists every problem "
        "and the head hash to compare with a copy kept elsewhere"
    )


def audit_path(state_dir: Path) -> Path:
    return state_dir / AUDIT_DIR / LOG_NAME


def head_path(log: Path) -> Path:
    return log.with_suffix(".head")


# -- records -------------------------------------------------------------------------------


def canonical(record: Mapping[str, Any]) -> bytes:
    """The bytes a record's hash covers. ASCII-only, so a lone surrogate cannot break encoding."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def record_hash(record: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


_SECRET_WORD = re.compile(
    r"secrets?|password|passwd|passphrase|authorization|cookie|credentials?|apikey|bearer"
)
_SECRET_VALUE = re.compile(r"sk-[A-Za-z0-9_-]{16,}|(?i:bearer)\s+[A-Za-z0-9._~+/=-]+")


def secret_name(name: str) -> bool:
    """key, api_key, x-api-key, accessToken, client_secret: yes. key_id, prompt_tokens: no."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]
    if not words:
        return False
    last = words[-1]
    return (
        last in ("key", "auth")
        or last.endswith(("token", "apikey", "secret"))
        or any(_SECRET_WORD.fullmatch(w) for w in words)
    )


def clean(value: Any, depth: int = 0) -> Any:
    """JSON-safe, secret-free copy of a field value."""
    if depth > 20:
        return REDACTED  # deeper than any real event: do not walk it
    if isinstance(value, Mapping):
        return {
            str(k): REDACTED if secret_name(str(k)) else clean(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [clean(v, depth + 1) for v in value]
    if isinstance(value, str):
        return _SECRET_VALUE.sub(REDACTED, value)
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return clean(str(value), depth + 1)


def _fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    # A caller's "ts" or "seq" must not overwrite the chain's own: keep it beside, renamed.
    return {f"{k}_" if k in RESERVED else k: v for k, v in clean(fields).items()}


def record_line(record: Mapping[str, Any]) -> bytes:
    """A record as the log stores it: compact JSON, its keys in the order they were built."""
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out


def parse_record(raw: bytes) -> dict[str, Any] | None:
    """A line as a record, or None when it is not one (not JSON, or lacks seq/prev/hash)."""
    try:
        rec = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError):
        return None
    if not isinstance(rec, dict):
        return None
    seq, prev, digest = rec.get("seq"), rec.get("prev"), rec.get("hash")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        return None
    if not isinstance(prev, str) or not isinstance(digest, str) or not _HEX64.match(digest):
        return None
    if not isinstance(rec.get("event"), str):
        return None
    return rec


# -- reading the file ------------------------------------------------------------------------


def _lines_backwards(fd: int, size: int) -> Iterator[bytes]:
    """Lines from the end, without their newlines; first the text after the last newline."""
    pos, buf = size, b""
    while pos > 0:
        n = min(CHUNK, pos)
        pos -= n
        buf = os.pread(fd, n, pos) + buf
        first, *complete = buf.split(b"\n")
        buf = first
        yield from reversed(complete)
    yield buf


def _lines_forward(path: Path, start: int, end: int) -> Iterator[bytes]:
    """Lines in [start, end) with their newlines; a last line without one comes out as is."""
    with path.open("rb") as f:
        f.seek(start)
        remaining, buf = end - start, b""
        while remaining > 0:
            chunk = f.read(min(CHUNK, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            *complete, buf = (buf + chunk).split(b"\n")
            for line in complete:
                yield line + b"\n"
        if buf:
            yield buf


@dataclass(frozen=True)
class Head:
    seq: int
    hash: str


def _read_head(path: Path) -> Head | None:
    """None when there is no head; ValueError when it is unreadable."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    data = json.loads(raw.strip() or b"null")
    if not isinstance(data, dict):
        raise ValueError("not a head record")
    seq, digest = data.get("seq"), data.get("hash")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise ValueError("bad seq")
    if not isinstance(digest, str) or not _HEX64.match(digest):
        raise ValueError("bad hash")
    return Head(seq, digest)


def _write_head(path: Path, head: Head, sync: bool = False) -> None:
    data = json.dumps(asdict(head), separators=(",", ":")).encode()
    data = data.ljust(HEAD_SIZE - 1) + b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        os.pwrite(fd, data, 0)
        if os.fstat(fd).st_size > HEAD_SIZE:
            os.ftruncate(fd, HEAD_SIZE)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Snapshot:
    """What the log held at one instant: its size and its head (None: no head; "bad")."""

    size: int
    head: Head | str | None
    exists: bool = True


def snapshot(path: Path) -> Snapshot:
    """The size and head, read under a shared lock so no append is half-way through."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return Snapshot(0, _head_or_bad(head_path(path)), exists=False)
    except OSError as exc:
        raise StateError(f"{path}: cannot read the audit log: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        return Snapshot(os.fstat(fd).st_size, _head_or_bad(head_path(path)))
    finally:
        os.close(fd)


def _head_or_bad(path: Path) -> Head | str | None:
    try:
        return _read_head(path)
    except (OSError, ValueError) as exc:
        return f"unreadable ({exc})"


# -- the writer ----------------------------------------------------------------------------


@dataclass
class _Tail:
    last: dict[str, Any] | None  # the last record that parses
    torn: bool  # the file does not end with a newline
    skipped: int  # unparseable lines after `last`, a torn fragment included


def _read_tail(fd: int, size: int) -> _Tail:
    if size == 0:
        return _Tail(None, False, 0)
    torn = os.pread(fd, 1, size - 1) != b"\n"
    lines = _lines_backwards(fd, size)
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
        head = _head_or_bad(self.head)
        if head is None and size == 0:
            _write_head(self.head, Head(0, GENESIS), sync=True)  # so a missing head means tamper
        anomalies = [(ANOMALY, a) for a in _anomalies(tail, head, size)]
        seq = tail.last["seq"] if tail.last else 0
        prev = tail.last["hash"] if tail.last else GENESIS
        records = []
        for event, fields in [*anomalies, *entries]:
            seq += 1
            rec = {"seq": seq, "ts": now_iso(), "event": str(event), **_fields(fields)}
            rec["prev"] = prev
            rec["hash"] = prev = record_hash(rec)
            records.append(rec)
        data = (b"\n" if tail.torn else b"") + b"".join(record_line(r) for r in records)
        while data:  # a regular file takes it whole; loop anyway rather than lose a tail
            data = data[os.write(fd, data) :]
        os.fdatasync(fd)
        _write_head(self.head, Head(seq, prev))
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


# -- verification --------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    line: int
    seq: int | None
    kind: str  # edited | deleted | inserted | reordered | truncated | corrupt | anchor
    detail: str

    def __str__(self) -> str:
        where = f"line {self.line}" + (f" (seq {self.seq})" if self.seq is not None else "")
        return f"{where}: {self.kind}: {self.detail}"


@dataclass
class Verification:
    path: str
    size: int = 0  # the bytes verified: appends after verify started are not part of it
    lines: int = 0
    records: int = 0
    last_seq: int = 0
    last_hash: str = GENESIS
    head: dict[str, Any] | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.ok:
            return f"ok: {self.records} records, last seq {self.last_seq}, hash {self.last_hash}"
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        return f"{self.path}: {self.problems[0]}{more}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "size": self.size,
            "lines": self.lines,
            "records": self.records,
            "last_seq": self.last_seq,
            "last_hash": self.last_hash,
            "head": self.head,
            "problems": [asdict(p) for p in self.problems],
        }


def _ranges(seqs: Sequence[tuple[int, int]]) -> str:
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in seqs)


class _Seen:
    """Seqs seen so far, as merged [first, last] ranges: one range for a healthy log."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def __contains__(self, seq: int) -> bool:
        i = bisect.bisect_right(self.starts, seq) - 1
        return i >= 0 and seq <= self.ends[i]

    def add(self, seq: int) -> None:
        if seq in self:
            return
        i = bisect.bisect_right(self.starts, seq)
        if i > 0 and self.ends[i - 1] == seq - 1:
            self.ends[i - 1] = seq
            i -= 1
        else:
            self.starts.insert(i, seq)
            self.ends.insert(i, seq)
        if i + 1 < len(self.starts) and self.starts[i + 1] == self.ends[i] + 1:
            self.ends[i] = self.ends.pop(i + 1)
            self.starts.pop(i + 1)

    def missing(self, first: int, last: int) -> list[tuple[int, int]]:
        out, at = [], first
        for s, e in zip(self.starts, self.ends, strict=True):
            if e < at:
                continue
            if s > last:
                break
            if s > at:
                out.append((at, s - 1))
            at = max(at, e + 1)
        if at <= last:
            out.append((at, last))
        return out


WINDOW = 4096  # hashes kept for linking records that arrive out of order


class _Verifier:
    def __init__(self, result: Verification) -> None:
        self.result = result
        self.prev_seq = 0
        self.prev_hash = GENESIS
        self.prev_line = 0
        self.seen = _Seen()
        self.by_seq: dict[int, tuple[int, str]] = {}  # seq -> (line, hash), the recent ones
        self.skips: list[tuple[list[tuple[int, int]], int, int]] = []  # (unseen, line, seq)
        self.dup: tuple[int, int, int, str] | None = None  # (seq, line, first line, first hash)
        self.bad_lines: set[int] = set()
        self.max_seq = 0

    def problem(self, line: int, seq: int | None, kind: str, detail: str) -> None:
        self.result.problems.append(Problem(line, seq, kind, detail))
        self.bad_lines.add(line)

    def feed(self, line: int, raw: bytes, last: bool) -> None:
        rec = parse_record(raw)
        partial = not raw.endswith(b"\n")
        if rec is None or partial:
            kind = "truncated" if last and partial else "corrupt"
            detail = "partial last line" if kind == "truncated" else "not an audit record"
            self.problem(line, rec["seq"] if rec else None, kind, detail)
            return
        self.result.records += 1
        seq = rec["seq"]
        if record_hash(rec) != rec["hash"]:
            self.problem(line, seq, "edited", "the record does not match its own hash")
            seq = self.prev_seq + 1  # its seq is not to be trusted: assume it was in place
        else:
            self.order(line, seq, rec)
        if rec["event"] == ANOMALY:
            what = rec.get("detail", "an inconsistency")
            self.problem(line, seq, str(rec.get("kind", "anomaly")), f"a writer found {what}")
        self.advance(line, seq, rec["hash"])

    def order(self, line: int, seq: int, rec: dict[str, Any]) -> None:
        """Where this record sits relative to the line before it, and whether they link."""
        self.settle_dup(seq, rec["prev"])
        if seq == self.prev_seq + 1:
            if rec["prev"] != self.prev_hash and self.prev_line not in self.bad_lines:
                if self.prev_line:  # re-hashed after an edit (or this prev was): blame the older
                    detail = f"its hash is not the prev that seq {seq} (line {line}) carries"
                    self.problem(self.prev_line, seq - 1, "edited", detail)
                else:
                    self.problem(line, seq, "edited", "its prev is not the genesis hash")
            return
        if seq > self.prev_seq + 1:
            unseen = self.seen.missing(self.prev_seq + 1, seq - 1)
            if unseen:  # deleted, or coming later (reordered): finish() tells which
                self.skips.append((unseen, line, seq))
        elif seq in self.seen:
            first_line, first_hash = self.by_seq.get(seq, (0, ""))
            self.dup = (seq, line, first_line, first_hash)
        else:
            self.problem(line, seq, "reordered", f"seq {seq} comes after seq {self.prev_seq}")
        linked = self.by_seq.get(seq - 1)
        if linked is not None and linked[1] != rec["prev"]:
            self.problem(line, seq, "edited", f"its prev is not the hash of seq {seq - 1}")

    def settle_dup(self, seq: int, prev: str) -> None:
        """A seq seen twice: the copy the next record links to is the genuine one."""
        if self.dup is None:
            return
        dup_seq, dup_line, first_line, first_hash = self.dup
        self.dup = None
        if first_line and seq == dup_seq + 1 and prev == self.prev_hash and prev != first_hash:
            detail = f"seq {dup_seq} is also at line {dup_line}, and the next record links there"
            self.problem(first_line, dup_seq, "inserted", detail)
        else:
            self.problem(dup_line, dup_seq, "inserted", f"seq {dup_seq} appears twice")

    def advance(self, line: int, seq: int, digest: str) -> None:
        self.seen.add(seq)
        self.by_seq.setdefault(seq, (line, digest))
        if len(self.by_seq) > WINDOW:
            del self.by_seq[next(iter(self.by_seq))]
        self.prev_seq, self.prev_hash, self.prev_line = seq, digest, line
        self.max_seq = max(self.max_seq, seq)
        self.result.last_seq, self.result.last_hash = seq, digest

    def finish(self, head: Head | str | None, lines: int) -> None:
        self.settle_dup(0, "")
        for unseen, line, seq_at in self.skips:
            gone = [r for a, b in unseen for r in self.seen.missing(a, b)]
            if gone:
                detail = f"seq {_ranges(gone)} missing (this line holds seq {seq_at})"
                self.problem(line, gone[0][0], "deleted", detail)
            if gone != unseen:
                later = _ranges(unseen)
                self.problem(line, seq_at, "reordered", f"seq {seq_at} comes before seq {later}")
        self.check_head(head, lines)
        self.result.problems.sort(key=lambda p: p.line)

    def check_head(self, head: Head | str | None, lines: int) -> None:
        if isinstance(head, str):
            self.problem(max(lines, 1), None, "anchor", f"the head file is {head}")
        elif head is None:
            if lines:
                self.problem(lines, None, "anchor", "the head file is missing")
        elif head.seq > self.max_seq:
            self.problem(
                lines + 1,
                self.max_seq + 1,
                "truncated",
                f"the head records seq {head.seq} but the log ends at seq {self.max_seq}",
            )
        elif head.seq:
            found = self.by_seq.get(head.seq)
            if found is not None and found[1] != head.hash:
                self.problem(found[0], head.seq, "edited", "the record does not match the head")


def verify(path: Path) -> Verification:
    """Check the whole chain as it was when verify started; appends after that are ignored."""
    snap = snapshot(path)
    result = Verification(str(path), size=snap.size)
    if isinstance(snap.head, Head):
        result.head = asdict(snap.head)
    checker = _Verifier(result)
    line = consumed = 0
    if snap.exists:
        for line, raw in enumerate(_lines_forward(path, 0, snap.size), start=1):
            consumed += len(raw)
            checker.feed(line, raw, last=consumed >= snap.size)
    result.lines = line
    checker.finish(snap.head, line)
    return result


def records(path: Path, start: int = 0, end: int | None = None) -> Iterator[dict[str, Any]]:
    """The records in [start, end) of the file, skipping lines that are not records."""
    end = snapshot(path).size if end is None else end
    if end <= start:
        return
    for raw in _lines_forward(path, start, end):
        rec = parse_record(raw)
        if rec is not None:
            yield rec


def last_records(
    path: Path, want: int, match: Callable[[dict[str, Any]], bool] | None = None
) -> tuple[list[dict[str, Any]], int]:
    """The last `want` records for which match(record) holds, oldest first, read from the end;
    and the size they were read up to (where a follow starts)."""
    snap = snapshot(path)
    if not snap.exists or want <= 0:
        return [], snap.size
    out: list[dict[str, Any]] = []
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for raw in _lines_backwards(fd, snap.size):
            rec = parse_record(raw)
            if rec is not None and (match is None or match(rec)):
                out.append(rec)
                if len(out) >= want:
                    break
    finally:
        os.close(fd)
    return out[::-1], snap.size


def follow(path: Path, offset: int, poll_s: float = 0.5) -> Iterator[dict[str, Any]]:
    """Records appended after `offset`, as they come (until the caller stops iterating)."""
    while True:
        size = path.stat().st_size if path.exists() else 0
        if size < offset:  # cut or replaced under us: carry on from its new end, and say so
            sys.stderr.write(f"appliance: warning: {path} shrank from {offset} to {size} bytes\n")
            offset = size
        if size > offset:
            with path.open("rb") as f:
                f.seek(offset)
                data = f.read(size - offset)
            complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits
            offset += len(complete)
            for raw in complete.splitlines(keepends=True):
                rec = parse_record(raw)
                if rec is not None:
                    yield rec
        time.sleep(poll_s)
