"""The `appliance` entry point: global options, command registration, and the one place where
exceptions become `appliance: error: ...` lines and exit codes (see appliance/errors.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from appliance import __version__
from appliance.cli import (
    agent,
    audit,
    blueprint,
    budget,
    bundle,
    config_cmd,
    doctor,
    hardware,
    image,
    keys,
    lifecycle,
    notify,
    operators,
    plan,
    sandbox,
    serve,
    status,
    units,
)
from appliance.cli.context import AppContext
from appliance.cli.output import print_error
from appliance.config import check_config_file
from appliance.errors import OPERATOR_ERRORS, exit_code_for

app = typer.Typer(
    name="appliance",
    help="GPU-local inference and agent appliance.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"appliance {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            envvar="APPLIANCE_CONFIG",
            help="Extra config file, read after /etc and $XDG_CONFIG_HOME.",
        ),
    ] = None,
    state_dir: Annotated[
        Path | None, typer.Option("--state-dir", help="State directory (SQLite store, logs).")
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print version.")
    ] = False,
) -> None:
    if config is not None:
        check_config_file(config)  # every command, even one that reads no config
        os.environ["APPLIANCE_CONFIG"] = str(config)
    ctx.obj = AppContext(flags={"state_dir": state_dir})


app.command("status")(status.status)
app.command("hardware")(hardware.hardware)
app.command("plan")(plan.plan)
app.command("doctor")(doctor.doctor)
app.command("up")(lifecycle.up)
app.command("down")(lifecycle.down)
app.add_typer(serve.app, name="serve")
app.add_typer(keys.app, name="keys")
app.add_typer(budget.app, name="budget")
app.add_typer(operators.app, name="operators")
app.add_typer(sandbox.app, name="sandbox")
app.add_typer(sandbox.approvals_app, name="approvals")
app.add_typer(image.app, name="image")
app.add_typer(blueprint.app, name="blueprint")
app.add_typer(agent.app, name="agent")
app.add_typer(units.app, name="units")
app.add_typer(bundle.app, name="bundle")
app.command("kill")(sandbox.kill)
app.command("release")(sandbox.release)
app.add_typer(config_cmd.app, name="config")
app.add_typer(audit.app, name="audit")
app.add_typer(notify.app, name="notify")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code; every failure is one line unless APPLIANCE_DEBUG=1."""
    debug = os.environ.get("APPLIANCE_DEBUG") == "1"
    try:
        result = app(args=argv, standalone_mode=False, prog_name="appliance")
        return result if isinstance(result, int) else 0
    except typer.Exit as exc:
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        sys.stderr.write("\nappliance: interrupted\n")
        return 130
    except typer.TyperException as exc:  # usage errors: shown with the usage line, like click
        exc.show()  # type: ignore[attr-defined]
        return getattr(exc, "exit_code", 2)
    except Exception as exc:
        if debug:
            raise
        if isinstance(exc, OPERATOR_ERRORS):
            print_error(str(exc), exc.hint)
        else:
            print_error(
                f"{type(exc).__name__}: {exc}",
                "run again with APPLIANCE_DEBUG=1 for the traceback, and report it",
            )
        return exit_code_for(exc)


def run() -> None:
    sys.exit(main())
