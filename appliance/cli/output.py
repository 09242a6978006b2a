"""Printing: JSON for scripts (stable key order), rich for people, errors as one line on stderr."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from pydantic import BaseModel
from rich.console import Console

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def to_data(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, list):
        return [to_data(o) for o in obj]
    if isinstance(obj, dict):
        return {k: to_data(v) for k, v in obj.items()}
    return obj


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(to_data(obj), indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()


def print_error(message: str, hint: str | None) -> None:
    # No rich markup here: messages carry paths and brackets that must print verbatim.
    sys.stderr.write(f"appliance: error: {message}\n")
    if hint:
        sys.stderr.write(f"  hint: {hint}\n")


def fmt(value: Any, unit: str = "", none: str = "n/a") -> str:
    """Render a telemetry value; None means the device did not report it."""
    if value is None:
        return none
    if isinstance(value, float):
        value = f"{value:.1f}"
    return f"{value}{unit}"


def when(ts: float | None) -> str:
    """A store timestamp as local minutes, or '-' for none."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


def revocation_cell(revoked_at: float | None) -> str:
    """A key's or an operator's state, as rich markup."""
    return f"[red]revoked {when(revoked_at)}[/]" if revoked_at else "[green]live[/]"


def print_secret_once(secret: str, noun: str) -> None:
    """A secret the store keeps only hashed: printed this once, verbatim, with the warning."""
    console.print(secret, markup=False, soft_wrap=True)
    console.print(f"[yellow]store this {noun} now: it is not shown again[/]")
