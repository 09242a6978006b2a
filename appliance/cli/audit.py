"""`appliance audit`: read, verify and export the host's hash-chained audit log."""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from appliance.audit import TamperError, audit_path, record_line, records, verify
from appliance.cli.context import app_context, control_client
from appliance.cli.options import JsonOpt
from appliance.cli.output import console, err_console, print_json
from appliance.errors import ApplianceError

app = typer.Typer(
    help="Read, verify and export the tamper-evident audit log.", no_args_is_help=True
)

HIDDEN = ("seq", "ts", "event", "prev", "hash")  # shown in the line's head, or noise to people
FOLLOW_POLL_S = 0.5


class Format(StrEnum):
    jsonl = "jsonl"
    json = "json"


def _log(ctx: typer.Context) -> Path:
    return audit_path(app_context(ctx).config().state_dir)


def _value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))


def render(rec: dict[str, Any]) -> str:
    ts = str(rec.get("ts", ""))
    ts = ts[:23] + "Z" if len(ts) > 23 else ts  # milliseconds are plenty on screen
    fields = " ".join(f"{k}={_value(v)}" for k, v in rec.items() if k not in HIDDEN)
    return f"{ts}  #{rec['seq']}  {rec['event']}  {fields}".rstrip()


def _emit(rec: dict[str, Any], json_out: bool) -> None:
    if json_out:
        print(json.dumps(rec, sort_keys=True), flush=True)
    else:
        console.print(render(rec), markup=False, soft_wrap=True)


@app.command("tail")
def tail(
    ctx: typer.Context,
    lines: Annotated[
        int, typer.Option("-n", "--lines", min=0, help="How many records to show.")
    ] = 20,
    follow_: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing records as they are appended.")
    ] = False,
    event: Annotated[
        str | None,
        typer.Option("--event", metavar="GLOB", help="Only events matching, e.g. 'egress.*'."),
    ] = None,
    sandbox: Annotated[
        str | None, typer.Option("--sandbox", metavar="NAME", help="Only this sandbox's records.")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Show the last records (--json: an array; with --follow, one JSON object a line).
    Read through the control plane (GET /api/v1/audit)."""
    with control_client(ctx) as client:
        page = client.audit_tail(lines, event, sandbox)
        recs = page["records"]
        if json_out and not follow_:
            print_json(recs)
            return
        for rec in recs:
            _emit(rec, json_out)
        if not follow_:
            if not recs and not json_out:
                console.print("no matching records" if page["next"] else "no audit log yet")
            return
        try:
            while True:  # poll for what was appended after the last answer
                time.sleep(FOLLOW_POLL_S)
                page = client.audit_tail(lines, event, sandbox, after=page["next"])
                if page.get("warning"):
                    err_console.print(f"warning: {page['warning']}", markup=False)
                for rec in page["records"]:
                    _emit(rec, json_out)
        except KeyboardInterrupt:
            raise typer.Exit(0) from None


@app.command("verify")
def verify_cmd(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """Check every record's hash and the links between them; exit 4 on any tampering.

    The error names the first bad line and seq and the kind: edited, deleted, inserted,
    reordered, truncated, corrupt, or anchor (the head file that pins the tail).
    """
    path = _log(ctx)
    result = verify(path)
    if json_out:
        print_json(result.as_dict())
    elif result.ok and not result.lines:
        console.print(f"no audit records yet ({path})", markup=False)
    elif result.ok:
        console.print(
            f"ok: {result.records} records, chain intact through seq {result.last_seq}\n"
            f"head {result.last_hash}  ({path})",
            markup=False,
            soft_wrap=True,
        )
    if not result.ok:
        raise TamperError(result.summary())


def _since(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(
            "expected an ISO-8601 time, e.g. 2025-06-01 or 2025-06-01T12:00:00Z",
            param_hint="--since",
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _after(rec: dict[str, Any], since: datetime) -> bool:
    try:
        return datetime.fromisoformat(rec["ts"]) >= since
    except (TypeError, ValueError):
        return True  # a record with a damaged time is evidence: keep it


def _write(out: Path, data: bytes) -> None:
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError as exc:
        raise ApplianceError(f"{out}: cannot write the export: {exc.strerror}") from None


@app.command("export")
def export(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", dir_okay=False, help="File to write (mode 600).")],
    since: Annotated[
        str | None,
        typer.Option("--since", metavar="ISO", help="Only records at or after this time (UTC)."),
    ] = None,
    fmt: Annotated[Format, typer.Option("--format", help="jsonl or json.")] = Format.jsonl,
    json_out: JsonOpt = False,
) -> None:
    """Write the records, headed by the verification of the whole log (jsonl: its first line)."""
    start = _since(since)
    path = _log(ctx)
    result = verify(path)
    recs = [r for r in records(path, 0, result.size) if start is None or _after(r, start)]
    header = {
        "source": str(path),
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "since": since,
        "records": len(recs),
        "verification": result.as_dict(),
    }
    if fmt is Format.json:
        data = (json.dumps({"audit_export": header, "records": recs}, indent=2) + "\n").encode()
    else:
        head = json.dumps({"audit_export": header}, separators=(",", ":")).encode() + b"\n"
        data = head + b"".join(record_line(r) for r in recs)
    _write(out, data)
    if json_out:
        print_json({"out": str(out), "records": len(recs), "verification": result.as_dict()})
    else:
        console.print(f"exported {len(recs)} records to {out}", markup=False)
    if not result.ok:
        raise TamperError(f"{result.summary()} (exported anyway, as evidence)")
