"""Audit records: where the log lives, what a record is (canonical JSON, its hash, its line),
the redaction every field goes through on the way in (the rule is hardware/secret_names.py's),
and parsing a line back."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.errors import StateError
from hardware.secret_names import is_secret_name, redact_secret_values

GENESIS = "0" * 64
AUDIT_DIR = "audit"
LOG_NAME = "audit.jsonl"
ANOMALY = "audit.anomaly"
REDACTED = "[redacted]"
RESERVED = frozenset({"seq", "ts", "event", "prev", "hash"})
HEX64 = re.compile(r"^[0-9a-f]{64}$")

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


def canonical(record: Mapping[str, Any]) -> bytes:
    """The bytes a record's hash covers. ASCII-only, so a lone surrogate cannot break encoding."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def record_hash(record: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def clean(value: Any, depth: int = 0) -> Any:
    """JSON-safe, secret-free copy of a field value (hardware/secret_names.py: the one rule)."""
    if depth > 20:
        return REDACTED  # deeper than any real event: do not walk it
    if isinstance(value, Mapping):
        return {
            str(k): REDACTED if is_secret_name(str(k)) else clean(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [clean(v, depth + 1) for v in value]
    if isinstance(value, str):
        return redact_secret_values(value, REDACTED)
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return clean(str(value), depth + 1)


def record_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
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
    if not isinstance(prev, str) or not isinstance(digest, str) or not HEX64.match(digest):
        return None
    if not isinstance(rec.get("event"), str):
        return None
    return rec
