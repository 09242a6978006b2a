"""`appliance config`: the merged configuration and where each layer lives."""

from __future__ import annotations

import typer

from appliance.cli.context import app_context
from appliance.cli.options import JsonOpt
from appliance.cli.output import console, print_json
from appliance.config import config_files

app = typer.Typer(help="Show the merged configuration.", no_args_is_help=True)


@app.command("show")
def show(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """Print the configuration after every layer is merged and validated."""
    config = app_context(ctx).config()
    if json_out:
        print_json(config)
        return
    import yaml

    console.print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).rstrip())


@app.command("paths")
def paths(json_out: JsonOpt = False) -> None:
    """List the config files consulted, lowest precedence first, and whether each exists."""
    files = [{"path": str(p), "exists": p.is_file()} for p in config_files()]
    if json_out:
        print_json(files)
        return
    for f in files:
        console.print(f"{'✓' if f['exists'] else '-'} {f['path']}")
