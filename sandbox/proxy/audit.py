"""AuditSinks for the proxy process run on its own: JSON lines to a file or stderr, or a list.

The appliance runs the proxy with its hash-chained audit log instead (sandbox/proxy/monitor.py
passes it in as the sink); `python -m sandbox.proxy` on its own keeps writing plain JSON lines.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import IO, Any


class JsonLinesAudit:
    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream or sys.stderr
        self._owned = False

    @classmethod
    def open(cls, path: Path) -> JsonLinesAudit:
        sink = cls(path.open("a"))
        sink._owned = True
        return sink

    def audit(self, event: str, **fields: Any) -> None:
        record = {"ts": time.time(), "event": event, **fields}
        self._stream.write(json.dumps(record, default=str) + "\n")
        self._stream.flush()

    def close(self) -> None:
        if self._owned:
            self._stream.close()


class MemoryAudit:
    """Keeps records in a list (tests, and embedding without a store)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def audit(self, event: str, **fields: Any) -> None:
        self.records.append({"event": event, **fields})
