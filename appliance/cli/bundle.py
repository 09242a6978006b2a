"""`appliance bundle create|verify|install`: the offline bundle (appliance/packaging/bundle.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from appliance.cli.context import app_context
from appliance.cli.options import JsonOpt
from appliance.cli.output import console, err_console, print_json

app = typer.Typer(help="Offline bundles: wheels, host packages, images, blueprints, models.")

BundleArg = Annotated[
    Path, typer.Argument(help="The bundle directory, or a tarball made with `create --tar`.")
]


def _progress(line: str) -> None:
    # stderr: stdout stays clean for --json
    err_console.print(line, markup=False, highlight=False, soft_wrap=True)


@app.command("create")
def create(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", help="The bundle directory to write (new).")],
    extras: Annotated[
        list[str] | None, typer.Option("--extra", help="Package extras to include.")
    ] = None,
    debs: Annotated[
        bool, typer.Option(help="Include the host packages' closure as an apt repository.")
    ] = True,
    images: Annotated[bool, typer.Option(help="Include the images the blueprints pin.")] = True,
    blueprint_dirs: Annotated[
        list[Path] | None,
        typer.Option("--blueprints", help="More blueprint directories (besides the config's)."),
    ] = None,
    models: Annotated[
        list[Path] | None, typer.Option("--model", help="Model weights (file or directory).")
    ] = None,
    tar: Annotated[bool, typer.Option(help="Also write OUT.tar.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Write a bundle on a connected machine, for hosts with no network."""
    from appliance.packaging.bundle import CreateOptions, create_bundle

    options = CreateOptions(
        extras=tuple(extras if extras is not None else ["embedded"]),
        debs=debs,
        images=images,
        blueprint_dirs=tuple(blueprint_dirs or ()),
        models=tuple(models or ()),
        tar=tar,
    )
    config = app_context(ctx).config()
    manifest = create_bundle(out, options, config, progress=_progress)
    if json_out:
        print_json(manifest)
    else:
        console.print(f"bundle written to {out.resolve()} (check with `appliance bundle verify`)")


@app.command("verify")
def verify(bundle: BundleArg, json_out: JsonOpt = False) -> None:
    """Check every file against SHA256SUMS; nothing unlisted, no links."""
    from appliance.packaging.bundle import BundleError, opened, verify_bundle

    with opened(bundle) as root:
        result = verify_bundle(root)
    if json_out:
        print_json({"bundle": str(result.root), "ok": result.ok, "checked": result.checked})
    for line in result.bad:
        console.print(f"  {line}", markup=False, highlight=False)
    if not result.ok:
        raise BundleError(f"{result.root}: {len(result.bad)} file(s) fail verification")
    if not json_out:
        console.print(f"{result.root}: {result.checked} files verified")


@app.command("install")
def install(
    ctx: typer.Context,
    bundle: BundleArg,
    venv: Annotated[
        Path | None,
        typer.Option(help="Virtualenv for the wheels (default: the one running this command)."),
    ] = None,
    wheels: Annotated[bool, typer.Option(help="Install the wheels.")] = True,
    images: Annotated[bool, typer.Option(help="Load the images into the sandbox Podman.")] = True,
    models: Annotated[bool, typer.Option(help="Copy the model weights.")] = True,
    blueprints: Annotated[bool, typer.Option(help="Copy the operator's blueprints.")] = True,
    json_out: JsonOpt = False,
) -> None:
    """Verify, then install what is not installed yet (a second run changes nothing)."""
    from appliance.packaging.bundle import InstallOptions, install_bundle, opened

    options = InstallOptions(
        venv=venv, wheels=wheels, images=images, models=models, blueprints=blueprints
    )
    config = app_context(ctx).config()
    with opened(bundle) as root:
        report = install_bundle(root, options, config, progress=_progress)
    if json_out:
        print_json({"bundle": str(report.root), "changed": report.changed, "steps": report.steps})
        return
    for step, what in report.steps.items():
        console.print(f"{step}: {what}", markup=False, highlight=False)
    console.print("installed" if report.changed else "nothing to do: already installed")
