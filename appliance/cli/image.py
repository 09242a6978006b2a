"""`appliance image`: build, save and load sandbox and appliance images (no registry).

A local command: it builds images into the service user's Podman store and decides nothing, so it
opens that Podman itself rather than asking the control plane.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from appliance.cli.context import app_context
from appliance.cli.options import JsonOpt
from appliance.cli.output import console, print_json

if TYPE_CHECKING:
    from podman import PodmanClient

    from appliance.config import ApplianceConfig

app = typer.Typer(help="Sandbox and appliance images (no registry).", no_args_is_help=True)


@contextmanager
def service_podman(ctx: typer.Context) -> Iterator[tuple[ApplianceConfig, PodmanClient]]:
    """The config and a client on the service user's Podman (started if it is not running)."""
    from sandbox.lifecycle.podman_service import PodmanService, ensure_ready

    config = app_context(ctx).config()
    ensure_ready()
    # The image cache lives under the state dir, private to root as the store would make it.
    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    yield config, PodmanService(user=config.sandbox.service_user).start()


def _progress(line: str) -> None:
    console.print(line, markup=False, highlight=False)


@app.command("build")
def build(
    ctx: typer.Context,
    suite: Annotated[str, typer.Option(help="Debian suite.")] = "bookworm",
    mirror: Annotated[str | None, typer.Option(help="Debian mirror URL.")] = None,
    layer: Annotated[
        str | None, typer.Option(help="Also build an agent layer on top: `openclaw`.")
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(
            help="Build the appliance image for `spark`, `rtx` or `cpu` instead "
            "(appliance/packaging/recipes/; see README: Appliance images)."
        ),
    ] = None,
    base_image: Annotated[
        str | None,
        typer.Option(help="With --target: the base image (default: the recipe's FROM)."),
    ] = None,
    pull: Annotated[
        bool,
        typer.Option(help="With --target spark|rtx: pull the vLLM image if it is not loaded."),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="With --target: print the build spec, build nothing.")
    ] = False,
) -> None:
    """Build the base sandbox image with debootstrap (no registry) into the service user's store,
    or, with --target, an appliance image (backend + gateway) on top of its base."""
    if target is not None:
        if layer is not None:
            raise typer.BadParameter("--layer builds a sandbox image; not with --target")
        _appliance_image_build(ctx, target, base_image, pull, dry_run)
        return
    if base_image is not None or pull or dry_run:
        raise typer.BadParameter("--base-image, --pull and --dry-run need --target")
    if layer is not None and layer != "openclaw":
        raise typer.BadParameter(f"unknown layer {layer!r} (known: openclaw)")
    from sandbox.images.base import build_base_image

    with service_podman(ctx) as (config, podman):
        ref = build_base_image(
            podman,
            workdir=config.state_dir / "images",
            suite=suite,
            mirror=mirror,
            progress=_progress,
        )
        # -- agent layer (sandbox/images/openclaw.py): Node + OpenClaw + rg/fd on top of the base.
        if layer is not None:
            from sandbox.images.openclaw import build_openclaw_image

            agent = build_openclaw_image(
                podman,
                workdir=config.state_dir / "images",
                base=ref,
                suite=suite,
                progress=_progress,
            )
    console.print(f"{ref.tag} ({ref.digest})")
    if layer is not None:
        console.print(f"{agent.tag} ({agent.inputs_digest})")


def _appliance_image_build(
    ctx: typer.Context, target: str, base_image: str | None, pull: bool, dry_run: bool
) -> None:
    """appliance/packaging/: the inference service's image for one target."""
    from appliance.packaging import appliance_image as ai
    from appliance.packaging.appliance_image_build import build_appliance_image

    if target not in ai.TARGETS:
        raise typer.BadParameter(f"unknown target {target!r} (known: {', '.join(ai.TARGETS)})")
    if dry_run:
        print_json(ai.dry_run(target, base_image))
        return
    with service_podman(ctx) as (config, podman):
        ref = build_appliance_image(
            podman,
            target,
            workdir=config.state_dir / "images",
            base=base_image,
            pull=pull,
            progress=_progress,
            service_user=config.sandbox.service_user,
        )
    console.print(ai.describe(ref))


@app.command("recipes")
def recipes(json_out: JsonOpt = False) -> None:
    """The image digests this appliance builds from pinned recipes: what a blueprint may pin
    (a missing image is built on first use; any other digest must be loaded from an archive)."""
    from appliance.packaging.images import known_recipes

    rows = [{"digest": d, "image": what} for d, (what, _) in known_recipes().items()]
    if json_out:
        print_json(rows)
        return
    for row in rows:
        console.print(
            f"{row['digest']}  {row['image']}", markup=False, highlight=False, soft_wrap=True
        )


@app.command("save")
def save(ctx: typer.Context, ref: str, path: Path) -> None:
    """Write an image to an OCI archive (for offline hosts)."""
    from sandbox.images.base import save_image

    with service_podman(ctx) as (_, podman):
        save_image(podman, ref, path, progress=console.print)


@app.command("load")
def load(ctx: typer.Context, path: Path) -> None:
    """Load an OCI archive written by `image save`."""
    from sandbox.images.base import load_image

    with service_podman(ctx) as (_, podman):
        ref = load_image(podman, path, progress=console.print)
    console.print(f"{ref.tag} ({ref.digest})")
