"""`appliance units render|install`: systemd units for the appliance's services."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from appliance.cli.context import app_context
from appliance.cli.options import JsonOpt
from appliance.cli.output import console, print_json

app = typer.Typer(help="systemd units for the appliance's services.", no_args_is_help=True)

ConfigFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--config-file",
        help="An extra config file for the units (APPLIANCE_CONFIG); "
        "/etc/appliance/appliance.yaml is always read.",
    ),
]


def _rendered(ctx: typer.Context, config_file: Path | None) -> dict[str, str]:
    from appliance.service_units import render_all

    config = app_context(ctx).config()
    executable = shutil.which("appliance") or str(Path(sys.executable).parent / "appliance")
    return render_all(executable=executable, state_dir=config.state_dir, config_file=config_file)


@app.command("render")
def render(
    ctx: typer.Context,
    config_file: ConfigFileOpt = None,
    out: Annotated[Path | None, typer.Option(help="Write the files into this directory.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Print (or write to --out) the units: backend, gateway, sandbox watcher."""
    units = _rendered(ctx, config_file)
    if json_out:
        print_json(units)
    elif out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in units.items():
            (out / name).write_text(text)
        console.print(f"wrote {', '.join(units)} to {out}")
    else:
        for name, text in units.items():
            console.print(f"# {name}\n{text}", highlight=False, markup=False)


@app.command("install")
def install(ctx: typer.Context, config_file: ConfigFileOpt = None) -> None:
    """Write the units to /etc/systemd/system, reload systemd and enable them (needs systemd;
    without it, `appliance up` runs the same services under its own supervisor)."""
    from appliance.errors import PreflightError
    from appliance.service_units import UNIT_DIR, systemd_running

    if not systemd_running():
        raise PreflightError(
            "systemd is not running on this host", hint="use `appliance up` instead"
        )
    units = _rendered(ctx, config_file)
    for name, text in units.items():
        (UNIT_DIR / name).write_text(text)
    subprocess.run(["systemctl", "daemon-reload"], check=True)
    subprocess.run(["systemctl", "enable", "--now", *units], check=True)
    console.print(f"installed and started {', '.join(units)}")
