"""Reading the audit log for the API: the last records (filtered), then what was appended after a
cursor (a byte offset), so `appliance audit tail --follow` can poll GET /audit.

Reading only: `audit verify` and `audit export` stay local commands (they must work with nothing
running), GET /audit/verify is the same check for the API's clients.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.audit import last_records, parse_record, verify

Match = Callable[[dict[str, Any]], bool]
CHUNK_LIMIT = 1 << 20  # bytes read per call after a cursor: a follower asks again for the rest


def matcher(event: str | None, sandbox: str | None) -> Match | None:
    """Records whose event matches the glob `event` and that name `sandbox` (None: any)."""
    if event is None and sandbox is None:
        return None

    def match(rec: dict[str, Any]) -> bool:
        if event is not None and not fnmatch.fnmatchcase(str(rec.get("event")), event):
            return False
        # A kill names its sandboxes in a list; everything else in `sandbox`.
        names = rec.get("sandboxes")
        return (
            sandbox is None
            or rec.get("sandbox") == sandbox
            or (isinstance(names, list) and sandbox in names)
        )

    return match


def tail(
    path: Path,
    limit: int,
    event: str | None = None,
    sandbox: str | None = None,
    after: int | None = None,
) -> dict[str, Any]:
    """{"records", "next"}: without `after`, the last `limit` matching records; with it, the
    matching records appended after that offset (whole lines only). `next` is the offset to ask
    from next time; `warning` says when the log shrank under the cursor (it starts again at
    the new end)."""
    match = matcher(event, sandbox)
    if after is None:
        recs, size = last_records(path, limit, match)
        return {"records": recs, "next": size}
    size = path.stat().st_size if path.exists() else 0
    if size < after:
        return {"records": [], "next": size, "warning": f"{path} shrank from {after} to {size}"}
    if size == after:
        return {"records": [], "next": after}
    with path.open("rb") as f:
        f.seek(after)
        data = f.read(min(size - after, CHUNK_LIMIT))
    complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits
    if not complete and len(data) == CHUNK_LIMIT:
        complete = data  # one "line" over a MiB is no record: step over it, never stall
    out = []
    for raw in complete.splitlines(keepends=True):
        rec = parse_record(raw)
        if rec is not None and (match is None or match(rec)):
            out.append(rec)
    return {"records": out, "next": after + len(complete)}


def verification(path: Path) -> dict[str, Any]:
    """The whole log's verification (as `appliance audit verify --json` prints it)."""
    return verify(path).as_dict()
