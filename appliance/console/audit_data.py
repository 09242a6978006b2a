"""The Audit page's data: the log's last records through the operator's filters, and the chain's
verification (cached while the log and its head are unchanged: verifying reads the whole log).

Filters come from a query string anyone can type: each is bounded (FILTER_MAX characters, limit
1..LIMIT_MAX) and matched as plain text (a prefix, an exact name, a substring), never as a
pattern, so no input is slow to match or means more than it says.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.audit import head_path, last_records, verify

FILTER_MAX = 200  # characters of one filter: an event name, an actor, a sandbox, some text
LIMIT_DEFAULT = 50
LIMIT_MAX = 1000
FILTERS = ("event", "actor", "sandbox", "text")


@dataclass(frozen=True)
class AuditFilter:
    event: str = ""  # an event name prefix, e.g. "egress." or "control.kill"
    actor: str = ""  # exactly the record's actor (an operator's name, uid:0, webhook:NAME)
    sandbox: str = ""  # the record's sandbox, or one of a kill's sandboxes
    text: str = ""  # anywhere in the record's JSON, ignoring case
    limit: int = LIMIT_DEFAULT

    @property
    def active(self) -> bool:
        return any(getattr(self, name) for name in FILTERS)

    def matches(self, rec: dict[str, Any]) -> bool:
        if self.event and not str(rec.get("event", "")).startswith(self.event):
            return False
        if self.actor and rec.get("actor") != self.actor:
            return False
        if self.sandbox:
            names = rec.get("sandboxes")
            named = isinstance(names, list) and self.sandbox in names
            if rec.get("sandbox") != self.sandbox and not named:
                return False
        if self.text:
            whole = json.dumps(rec, ensure_ascii=False, sort_keys=True).casefold()
            if self.text.casefold() not in whole:
                return False
        return True


def parse_filter(params: Mapping[str, str]) -> tuple[AuditFilter, list[str]]:
    """The filter a query string asks for, and what was wrong with it (each a sentence; a bad
    field is left out of the filter, never half-applied)."""
    errors = []
    fields: dict[str, Any] = {}
    for name in FILTERS:
        value = params.get(name, "").strip()
        if len(value) > FILTER_MAX:
            errors.append(f"{name}: at most {FILTER_MAX} characters (this one has {len(value)})")
        elif any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
            errors.append(f"{name}: control characters are not allowed")
        else:
            fields[name] = value
    raw_limit = params.get("limit", "").strip()
    if raw_limit:
        if raw_limit.isascii() and raw_limit.isdigit() and len(raw_limit) <= 7:
            fields["limit"] = min(max(int(raw_limit), 1), LIMIT_MAX)
        else:
            errors.append(f"limit: a whole number from 1 to {LIMIT_MAX}")
    return AuditFilter(**fields), errors


def tail(path: Path, wanted: AuditFilter) -> list[dict[str, Any]]:
    """The last `wanted.limit` matching records, newest first (as a tail is read on a page)."""
    match = wanted.matches if wanted.active else None
    records, _size = last_records(path, wanted.limit, match)
    return records[::-1]


def _stamp(path: Path) -> tuple[int, int, int, int] | None:
    """What changes when the log or its head does (size and mtime of each)."""
    try:
        log = os.stat(path)
    except FileNotFoundError:
        return None
    try:
        head = os.stat(head_path(path))
        head_stamp = (head.st_size, head.st_mtime_ns)
    except FileNotFoundError:
        head_stamp = (-1, -1)
    return (log.st_size, log.st_mtime_ns, *head_stamp)


class VerifyCache:
    """The last verification per log, reused while the log and its head are unchanged. Thread-
    safe; two pages verifying at once each verify (no lock is held while verifying)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[Path, tuple[tuple[int, int, int, int] | None, dict[str, Any]]] = {}

    def verification(self, path: Path) -> dict[str, Any]:
        stamp = _stamp(path)
        with self._lock:
            cached = self._last.get(path)
        if cached is not None and cached[0] == stamp and stamp is not None:
            return cached[1]
        result = verify(path).as_dict()
        with self._lock:
            self._last[path] = (stamp, result)
        return result
