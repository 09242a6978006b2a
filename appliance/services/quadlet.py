"""Podman Quadlet files for the appliance image (`appliance units render --container IMAGE`).

Where the inference service runs as its container image (appliance/packaging/recipes/,
`appliance image build --target spark|rtx|cpu`), systemd runs the container through Quadlet: a
`.container` file in /etc/containers/systemd/ becomes `appliance-inference.service` at
`systemctl daemon-reload`.
The state lives in a Podman volume (`appliance-state.volume`: keys, ledger, audit log, logs,
caches); the GPU images read their weights from the host's models directory, read-only.

Every `[Container]` setting is one `Setting`: its Quadlet key and the `podman run` flag
Quadlet turns it into (podman-systemd.unit(5)), so the same data renders the file and the
equivalent `podman run` argv (golden-tested; an integration test runs the cpu image with it,
since Podman 4.3 here has no Quadlet generator). Rootful: Quadlet files in /etc are run by
root's Podman, so the image must be in root's image store, not the service user's.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import ApplianceError, PreflightError

QUADLET_DIR = Path("/etc/containers/systemd")
UNIT = "appliance-inference"  # appliance-inference.container -> appliance-inference.service
STATE_VOLUME = "appliance-state"  # appliance-state.volume
# Quadlet names a .volume's Podman volume systemd-<name> (VolumeName= to change it is newer).
STATE_VOLUME_NAME = f"systemd-{STATE_VOLUME}"
# Quadlet itself arrived in 4.4; the Health*= keys in 4.5. Notify=healthy (start = model loaded)
# needs 5.x, so it is a documented drop-in, not part of the file.
MIN_PODMAN = (4, 5)

# What the recipes declare (tests compare with each Containerfile): EXPOSE, the VOLUMEs, the
# config file every layer reads.
CONTAINER_PORT = 8080
STATE_MOUNT = "/var/lib/appliance"
MODELS_MOUNT = "/models"
CONFIG_MOUNT = "/etc/appliance/appliance.yaml"
# The image's HEALTHCHECK, given explicitly (an OCI archive from `image save` drops HEALTHCHECK)
# in shell form, with no `%` or `$`: Quadlet copies it into ExecStart, where systemd expands them.
HEALTH_CMD = (
    "/opt/appliance/venv/bin/python -c 'import urllib.request as u; "
    f'u.urlopen("http://127.0.0.1:{CONTAINER_PORT}/health/ready", timeout=4)\''
)
# vLLM (PyTorch workers, NCCL) shares tensors through /dev/shm; Podman's default is 64 MB.
# A size, not --ipc=host: the host's IPC namespace stays out of the container.
GPU_SHM_SIZE = "16g"
# A Super NVFP4 load on a Spark takes 10-15 min: the start period matches the recipes'
# HEALTHCHECK, and the start timeout leaves room for it (with Notify=healthy on Podman 5).
START_TIMEOUT_S = 1800
# Characters a value may not carry into a unit file: a newline would start a new key, `%` is a
# systemd specifier, whitespace splits PodmanArgs and Volume.
_UNSAFE = re.compile(r"[\s%\"'\\]")
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]*$")
_TARGET_IN_IMAGE = re.compile(r"(?:^|/)appliance-(\w+)(?:[:@]|$)")


class UnitsError(ApplianceError):
    """Quadlet files could not be rendered as asked."""

    hint = "see `appliance units render --help`"


@dataclass(frozen=True)
class Runtime:
    """How a target's image runs: the GPU and what the recipe's HEALTHCHECK allows for a load."""

    gpu: bool
    health_start_period: str


RUNTIMES: dict[str, Runtime] = {
    "spark": Runtime(gpu=True, health_start_period="30m"),
    "rtx": Runtime(gpu=True, health_start_period="30m"),
    "cpu": Runtime(gpu=False, health_start_period="5m"),  # first start converts the GGUF
}


# How Quadlet turns a [Container] key into `podman run` flags (podman-systemd.unit(5)): a
# value flag, or, for booleans, the flag `true` adds. VolatileTmp=true with ReadOnly=true keeps
# --read-only's default tmpfs (Quadlet 4.5-4.7 adds --read-only-tmpfs=false without it).
_VALUE_FLAGS = {
    "ContainerName": "--name",
    "PublishPort": "--publish",
    "Volume": "--volume",
    "AddDevice": "--device",
    "Environment": "--env",
    "HealthCmd": "--health-cmd",
    "HealthInterval": "--health-interval",
    "HealthTimeout": "--health-timeout",
    "HealthRetries": "--health-retries",
    "HealthStartPeriod": "--health-start-period",
}
_TRUE_FLAGS = {
    "NoNewPrivileges": "--security-opt=no-new-privileges",
    "ReadOnly": "--read-only",
    "VolatileTmp": "--read-only-tmpfs=true",
}


@dataclass(frozen=True)
class Setting:
    key: str  # the Quadlet [Container] key
    value: str

    @property
    def argv(self) -> tuple[str, ...]:
        """What Quadlet passes to `podman run` for it."""
        if self.key == "Image":
            return ()  # positional: last in the argv
        if self.key == "Volume" and self.value.split(":", 1)[0].endswith(".volume"):
            # Quadlet names a .volume's Podman volume systemd-<name>.
            return (f"--volume=systemd-{self.value.replace('.volume', '', 1)}",)
        if self.key == "DropCapability":
            return tuple(f"--cap-drop={c.lower()}" for c in self.value.split())
        if self.key == "PodmanArgs":
            return tuple(self.value.split())
        if self.key in _TRUE_FLAGS:
            return (_TRUE_FLAGS[self.key],) if self.value == "true" else ()
        return (f"{_VALUE_FLAGS[self.key]}={self.value}",)


@dataclass(frozen=True)
class QuadletSpec:
    image: str
    target: str
    host_port: int = 8080
    publish_address: str = "127.0.0.1"
    models_dir: Path | None = None  # GPU targets: the host's models directory (read-only)
    config_file: Path | None = None  # mounted read-only as /etc/appliance/appliance.yaml

    @property
    def runtime(self) -> Runtime:
        return RUNTIMES[self.target]

    def settings(self, *, name: str = UNIT, volume: str = STATE_VOLUME) -> list[Setting]:
        """The [Container] keys in file order. `name`/`volume`: a test runs its own copy."""
        publish = f"{_publish_host(self.publish_address)}:{self.host_port}:{CONTAINER_PORT}"
        out = [
            Setting("ContainerName", name),
            Setting("Image", self.image),
            Setting("PublishPort", publish),
            Setting("Volume", f"{volume}.volume:{STATE_MOUNT}"),
        ]
        if self.runtime.gpu:
            out.append(Setting("Volume", f"{self.models_dir}:{MODELS_MOUNT}:ro"))
        if self.config_file is not None:
            out.append(Setting("Volume", f"{self.config_file}:{CONFIG_MOUNT}:ro"))
        if self.runtime.gpu:
            # CDI: the appliance_nvidia role writes /etc/cdi/nvidia.yaml (nvidia-ctk).
            out.append(Setting("AddDevice", "nvidia.com/gpu=all"))
        out += [
            # The gateway's port inside stays the one published and probed, whatever the config.
            Setting("Environment", f"APPLIANCE_GATEWAY__PORT={CONTAINER_PORT}"),
            # The confinement tests/integration/test_appliance_image_cpu.py runs the image under.
            Setting("NoNewPrivileges", "true"),
            Setting("DropCapability", "ALL"),
            Setting("ReadOnly", "true"),
            Setting("VolatileTmp", "true"),  # /tmp, /var/tmp, /run stay tmpfs
            Setting("HealthCmd", HEALTH_CMD),
            Setting("HealthInterval", "30s"),
            Setting("HealthTimeout", "5s"),
            Setting("HealthRetries", "3"),
            Setting("HealthStartPeriod", self.runtime.health_start_period),
        ]
        if self.runtime.gpu:
            out.append(Setting("PodmanArgs", f"--shm-size={GPU_SHM_SIZE}"))
        # Offline: a missing image is an error at start, never a pull.
        out.append(Setting("PodmanArgs", "--pull=never"))
        return out

    def podman_run_argv(self, *, name: str = UNIT, volume: str = STATE_VOLUME) -> list[str]:
        """The `podman run` these settings amount to (Quadlet adds its own service plumbing:
        --cidfile, --replace, --rm, -d, --sdnotify=conmon, --log-driver passthrough)."""
        flags = [a for s in self.settings(name=name, volume=volume) for a in s.argv]
        return ["podman", "run", *flags, self.image]


def _publish_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def spec_for(
    image: str,
    *,
    target: str | None = None,
    host_port: int = 8080,
    publish_address: str = "127.0.0.1",
    allow_non_loopback: bool = False,
    models_dir: Path | None = None,
    config_file: Path | None = None,
) -> QuadletSpec:
    """A checked spec: every value that reaches the file is validated here."""
    if not _IMAGE.match(image):
        raise UnitsError(
            f"{image!r} is not an image reference",
            hint="e.g. localhost/appliance-spark:latest (`podman images` lists them)",
        )
    target = target or target_from_image(image)
    if target not in RUNTIMES:
        raise UnitsError(f"unknown target {target!r}", hint=f"targets: {', '.join(RUNTIMES)}")
    if not 1 <= host_port <= 65535:
        raise UnitsError(f"port {host_port} is out of range", hint="gateway.port: 1-65535")
    try:
        addr = ipaddress.ip_address(publish_address)
    except ValueError:
        raise UnitsError(
            f"publish address {publish_address!r} is not an IP address",
            hint="e.g. 127.0.0.1, or a LAN address of this host",
        ) from None
    if not addr.is_loopback and not allow_non_loopback:
        raise UnitsError(
            f"publishing the gateway on {publish_address} reaches beyond this host",
            hint="every /v1 call still needs a key; pass --allow-non-loopback to mean it",
        )
    runtime = RUNTIMES[target]
    if runtime.gpu and models_dir is None:
        raise UnitsError(f"the {target} image reads its weights from {MODELS_MOUNT}: no models dir")
    for label, path in (("models dir", models_dir), ("config file", config_file)):
        if path is not None and (not path.is_absolute() or _UNSAFE.search(str(path))):
            raise UnitsError(
                f"{label} {str(path)!r} must be an absolute path without spaces, quotes or %",
                hint="a unit file cannot carry it safely; use a plain absolute path",
            )
    return QuadletSpec(
        image=image,
        target=target,
        host_port=host_port,
        publish_address=str(addr),
        models_dir=models_dir if runtime.gpu else None,
        config_file=config_file,
    )


def target_from_image(image: str) -> str:
    """`localhost/appliance-spark:3f0087d3eadf` -> spark (the builder's repository names)."""
    found = _TARGET_IN_IMAGE.search(image)
    if found is None or found.group(1) not in RUNTIMES:
        raise UnitsError(
            f"cannot tell the target from {image!r}",
            hint=f"pass --target ({', '.join(RUNTIMES)})",
        )
    return found.group(1)


def render_container(spec: QuadletSpec) -> str:
    gpu = " with the GPU (CDI)" if spec.runtime.gpu else ""
    lines = [
        "# Generated by `appliance units render --container`; re-render rather than edit.",
        "# Podman Quadlet (podman-systemd.unit(5)): needs Podman >= "
        f"{MIN_PODMAN[0]}.{MIN_PODMAN[1]} (Quadlet arrived in 4.4,",
        "# the Health*= keys in 4.5). In /etc/containers/systemd/, `systemctl daemon-reload` makes",
        f"# {UNIT}.service; root's Podman runs it, so the image must be in root's store.",
        "# Podman >= 5: a drop-in with `[Container]` `Notify=healthy` makes `systemctl start` wait",
        "# until the model is loaded (the start timeout below allows for that).",
        "[Unit]",
        f"Description=Appliance inference (backend + gateway) in {spec.image}{gpu}",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Container]",
        *(f"{s.key}={s.value}" for s in spec.settings()),
        "",
        "[Service]",
        "Restart=always",
        "RestartSec=10",
        f"TimeoutStartSec={START_TIMEOUT_S}",
        "",
        "[Install]",
        "WantedBy=multi-user.target default.target",
        "",
    ]
    return "\n".join(lines)


def render_state_volume() -> str:
    lines = [
        "# Generated by `appliance units render --container`; re-render rather than edit.",
        f"# Podman Quadlet: the Podman volume {STATE_VOLUME_NAME} (Podman >= 4.4), mounted at",
        f"# {STATE_MOUNT}. It starts empty and Podman copies the image's directory (owner uid",
        "# 10001) into it on first use. Back it up with `podman volume export`.",
        "[Unit]",
        "Description=Appliance state (keys, ledger, audit log, logs, caches)",
        "",
        "[Volume]",
        "Label=org.appliance.volume=state",
        "",
    ]
    return "\n".join(lines)


def render_quadlet(spec: QuadletSpec) -> dict[str, str]:
    return {
        f"{UNIT}.container": render_container(spec),
        f"{STATE_VOLUME}.volume": render_state_volume(),
    }


def parse_podman_version(text: str) -> tuple[int, int] | None:
    """`podman version 4.3.1` -> (4, 3)."""
    found = re.search(r"(\d+)\.(\d+)", text)
    return (int(found.group(1)), int(found.group(2))) if found else None


def podman_version() -> tuple[int, int] | None:
    """This host's Podman (None: not installed)."""
    if shutil.which("podman") is None:
        return None
    done = subprocess.run(["podman", "--version"], capture_output=True, text=True, check=False)
    return parse_podman_version(done.stdout)


def check_quadlet_host(version: tuple[int, int] | None) -> None:
    """Refuse a host whose Podman cannot run these files."""
    need = f"{MIN_PODMAN[0]}.{MIN_PODMAN[1]}"
    if version is None:
        raise PreflightError("podman is not installed", hint=f"install Podman >= {need}")
    if version < MIN_PODMAN:
        raise PreflightError(
            f"Podman {version[0]}.{version[1]} cannot run these Quadlet files (needs >= {need})",
            hint="upgrade Podman, or run the `podman_run` argv that `appliance units render "
            "--container IMAGE --json` prints",
        )
