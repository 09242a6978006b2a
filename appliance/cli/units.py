"""`appliance units render|install`: systemd units for the appliance's services, or (with
--container IMAGE) Podman Quadlet files that run the appliance image."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from appliance.cli.context import app_context
from appliance.cli.options import JsonOpt
from appliance.cli.output import console, print_json

if TYPE_CHECKING:  # imported lazily at run time: the CLI starts fast
    from appliance.services.quadlet import QuadletSpec

app = typer.Typer(help="systemd units for the appliance's services.", no_args_is_help=True)

ConfigFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--config-file",
        help="An extra config file for the units (APPLIANCE_CONFIG); "
        "/etc/appliance/appliance.yaml is always read. With --container: mounted read-only "
        "as the container's /etc/appliance/appliance.yaml.",
    ),
]
ContainerOpt = Annotated[
    str | None,
    typer.Option(
        "--container",
        metavar="IMAGE",
        help="Podman Quadlet files that run this appliance image (`appliance image build "
        "--target ...`) instead of the host units.",
    ),
]
TargetOpt = Annotated[
    str | None,
    typer.Option(help="With --container: spark, rtx or cpu (default: from the image's name)."),
]
PublishOpt = Annotated[
    str,
    typer.Option(
        "--publish-address",
        help="With --container: the host address the gateway is published on (port: "
        "gateway.port from the config).",
    ),
]
AllowOpt = Annotated[
    bool,
    typer.Option(
        "--allow-non-loopback",
        help="With --container: allow a --publish-address other than loopback.",
    ),
]
ModelsOpt = Annotated[
    Path | None,
    typer.Option(
        "--models-dir",
        help="With --container, GPU targets: the host's models directory, mounted read-only "
        "as /models (default: the config's models_dir).",
    ),
]


def _rendered(ctx: typer.Context, config_file: Path | None) -> dict[str, str]:
    from appliance.services.systemd import render_all

    config = app_context(ctx).config()
    executable = shutil.which("appliance") or str(Path(sys.executable).parent / "appliance")
    return render_all(executable=executable, state_dir=config.state_dir, config_file=config_file)


def _quadlet_spec(
    ctx: typer.Context,
    image: str,
    target: str | None,
    publish_address: str,
    allow_non_loopback: bool,
    models_dir: Path | None,
    config_file: Path | None,
) -> QuadletSpec:
    from appliance.services.quadlet import spec_for

    config = app_context(ctx).config()
    return spec_for(
        image,
        target=target,
        host_port=config.gateway.port,
        publish_address=publish_address,
        allow_non_loopback=allow_non_loopback,
        models_dir=models_dir or config.resolved_models_dir,
        config_file=config_file.resolve() if config_file else None,
    )


def _write(out: Path, files: dict[str, str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text)


@app.command("render")
def render(
    ctx: typer.Context,
    config_file: ConfigFileOpt = None,
    container: ContainerOpt = None,
    target: TargetOpt = None,
    publish_address: PublishOpt = "127.0.0.1",
    allow_non_loopback: AllowOpt = False,
    models_dir: ModelsOpt = None,
    out: Annotated[Path | None, typer.Option(help="Write the files into this directory.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Print (or write to --out) the units: control plane, backend, gateway, sandbox watcher;
    with --container IMAGE, the Quadlet files for the appliance image (and, with --json, the
    `podman run` they amount to)."""
    if container is None:
        units = _rendered(ctx, config_file)
        extra: dict[str, object] = {}
    else:
        from appliance.services.quadlet import MIN_PODMAN, render_quadlet

        spec = _quadlet_spec(
            ctx, container, target, publish_address, allow_non_loopback, models_dir, config_file
        )
        units = render_quadlet(spec)
        extra = {
            "min_podman": f"{MIN_PODMAN[0]}.{MIN_PODMAN[1]}",
            "podman_run": spec.podman_run_argv(),
            "target": spec.target,
        }
    if json_out:
        print_json({"files": units, **extra} if container else units)
    elif out is not None:
        _write(out, units)
        console.print(f"wrote {', '.join(units)} to {out}")
    else:
        for name, text in units.items():
            console.print(f"# {name}\n{text}", highlight=False, markup=False)


@app.command("install")
def install(
    ctx: typer.Context,
    config_file: ConfigFileOpt = None,
    container: ContainerOpt = None,
    target: TargetOpt = None,
    publish_address: PublishOpt = "127.0.0.1",
    allow_non_loopback: AllowOpt = False,
    models_dir: ModelsOpt = None,
) -> None:
    """Write the units to /etc/systemd/system, reload systemd and enable them (needs systemd;
    without it, `appliance up` runs the same services under its own supervisor). With
    --container IMAGE: the Quadlet files to /etc/containers/systemd, then start the service."""
    from appliance.errors import PreflightError
    from appliance.services.systemd import UNIT_DIR, systemd_running

    if container is not None:
        _install_quadlet(
            ctx, container, target, publish_address, allow_non_loopback, models_dir, config_file
        )
        return
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


def _install_quadlet(
    ctx: typer.Context,
    image: str,
    target: str | None,
    publish_address: str,
    allow_non_loopback: bool,
    models_dir: Path | None,
    config_file: Path | None,
) -> None:
    from appliance.errors import PreflightError
    from appliance.services import quadlet as q
    from appliance.services.systemd import systemd_running

    spec = _quadlet_spec(
        ctx, image, target, publish_address, allow_non_loopback, models_dir, config_file
    )
    q.check_quadlet_host(q.podman_version())
    if not systemd_running():
        raise PreflightError(
            "systemd is not running on this host",
            hint="run the `podman_run` argv from `appliance units render --container IMAGE "
            "--json` instead",
        )
    # Root's Podman runs /etc/containers/systemd; the builder's image is in the service user's.
    if subprocess.run(["podman", "image", "exists", image], check=False).returncode != 0:
        raise PreflightError(
            f"{image} is not in root's image store (Quadlet units in /etc run root's Podman)",
            hint=f"`appliance image save {image} appliance.tar`, then as root `podman load -i "
            "appliance.tar`",
        )
    files = q.render_quadlet(spec)
    _write(q.QUADLET_DIR, files)
    # Generated units cannot be `enable`d: [Install] in the .container does that at reload.
    subprocess.run(["systemctl", "daemon-reload"], check=True)
    subprocess.run(["systemctl", "start", f"{q.UNIT}.service"], check=True)
    console.print(f"installed {', '.join(files)} in {q.QUADLET_DIR}; started {q.UNIT}.service")
