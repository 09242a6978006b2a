"""Verifying the chain: every kind of tampering found and named by line and seq (edited, deleted,
inserted, reordered, truncated, corrupt, anchor), in one pass with bounded memory."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from appliance.audit.logfile import Head, lines_forward, snapshot
from appliance.audit.records import ANOMALY, GENESIS, parse_record, record_hash


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
        for line, raw in enumerate(lines_forward(path, 0, snap.size), start=1):
            consumed += len(raw)
            checker.feed(line, raw, last=consumed >= snap.size)
    result.lines = line
    checker.finish(snap.head, line)
    return result
