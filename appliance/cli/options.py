"""Option types shared by every command group, so each flag is spelled and documented once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
WatchOpt = Annotated[
    bool, typer.Option("--watch", "-w", help="Redraw every --interval seconds until Ctrl-C.")
]
IntervalOpt = Annotated[
    float, typer.Option("--interval", min=0.2, help="Seconds between redraws with --watch.")
]
SnapshotOpt = Annotated[
    Path | None,
    typer.Option(
        "--host-snapshot",
        exists=True,
        dir_okay=False,
        help="Plan for a recorded host (HostSnapshot JSON) instead of this machine.",
    ),
]
