"""Reading the log file: its lines from either end, its head (the tail's anchor, rewritten in
place), a consistent snapshot of both, and the records in it (all, the last N, or as they come)."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from appliance.audit.records import HEX64, head_path, parse_record
from appliance.errors import StateError

HEAD_SIZE = 160  # the head is rewritten in place at a fixed size: one small pwrite, no truncate
CHUNK = 1 << 16


def lines_backwards(fd: int, size: int) -> Iterator[bytes]:
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


def lines_forward(path: Path, start: int, end: int) -> Iterator[bytes]:
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
    if not isinstance(digest, str) or not HEX64.match(digest):
        raise ValueError("bad hash")
    return Head(seq, digest)


def write_head(path: Path, head: Head, sync: bool = False) -> None:
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
        return Snapshot(0, head_or_bad(head_path(path)), exists=False)
    except OSError as exc:
        raise StateError(f"{path}: cannot read the audit log: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        return Snapshot(os.fstat(fd).st_size, head_or_bad(head_path(path)))
    finally:
        os.close(fd)


def head_or_bad(path: Path) -> Head | str | None:
    try:
        return _read_head(path)
    except (OSError, ValueError) as exc:
        return f"unreadable ({exc})"


def records(path: Path, start: int = 0, end: int | None = None) -> Iterator[dict[str, Any]]:
    """The records in [start, end) of the file, skipping lines that are not records."""
    end = snapshot(path).size if end is None else end
    if end <= start:
        return
    for raw in lines_forward(path, start, end):
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
        for raw in lines_backwards(fd, snap.size):
            rec = parse_record(raw)
            if rec is not None and (match is None or match(rec)):
                out.append(rec)
                if len(out) >= want:
                    break
    finally:
        os.close(fd)
    return out[::-1], snap.size
