"""A JSON-lines AuditSink for the standalone process (the control plane ingests the file)."""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any


class JsonLinesAudit:
    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream or sys.stderr

    def audit(self, event: str, **fields: Any) -> None:
        record = {"ts": time.time(), "event": event, **fields}
        self._stream.write(json.dumps(record, default=str) + "\n")
        self._stream.flush()


class MemoryAudit:
    """Keeps records in a list (tests, and embedding without a store)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def audit(self, event: str, **fields: Any) -> None:
        self.records.append({"event": event, **fields})
