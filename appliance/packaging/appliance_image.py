"""Appliance images: the inference service (`appliance serve all`: backend + gateway) as an OCI
image, built from the recipes in appliance/packaging/recipes/ by the service user's Podman.

This module says what an image is (targets, the build spec, its inputs and their digest);
appliance_image_build.py builds one (the base, the context, `podman build`, pruning).

Targets:
  spark  DGX Spark (GB10, sm_121, CUDA 13), linux/arm64, on the vLLM image the Spark recipe names
  rtx    RTX hosts, linux/amd64, on the same vLLM release
  cpu    no GPU: the embedded model, on the debootstrap base image (by id, never pulled)

The build context is the Containerfile, wheels/ (the appliance wheelhouse for the image's
platform and Python, appliance/packaging/wheelhouse.py), tools/pip.whl (pip's own wheel: the
images get pip from it, not from the network) and, for Spark, vllm-extras/ (fastsafetensors,
should vLLM's Python lack it). The build runs with `--network=none`: nothing is fetched inside.
The image is tagged `localhost/appliance-<target>:<first 12 hex of the inputs digest>` (recipe,
Containerfile, base, pins, the appliance's own source) and labelled with it; the same inputs
again are a lookup. The wheels are cached per target, so a rebuild after a code change fetches
nothing.
"""

from __future__ import annotations

import hashlib
import json
import platform as host_platform
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.errors import ApplianceError
from appliance.packaging import containerfile as cf
from appliance.packaging.wheelhouse import (
    DIST_NAME,
    REQUIREMENTS_FILE,
    download_argv,
    marker_env,
    pinned_closure,
    source_digest,
)
from hardware.snapshot import HostClass, HostSnapshot
from sandbox.images.base import RECIPE_LABEL
from sandbox.images.layers import INPUTS_LABEL, LABEL_PREFIX, find_by_inputs

Progress = Callable[[str], None]

RECIPES = Path(__file__).resolve().parent / "recipes"
REPOSITORY_PREFIX = "localhost/appliance"
# Bump when the context layout or the builder's treatment of a recipe changes.
RECIPE_VERSION = 1
# REFERENCE §2: the planner's flags are those of the recipes for vLLM >= 0.24 (the Spark recipe's
# image is v0.24.0; --mamba-cache-mode, the nemotron_v3 reasoning parser). The GPU Containerfiles
# refuse an older vLLM at build time and the tests hold their FROM to it.
MIN_VLLM_VERSION = "0.24.0"
# vllm 0.24.0 declares fastsafetensors>=0.3.2, so its image should carry it; this pin fills the
# gap if an overridden VLLM_IMAGE lacks it (cp312 wheels for aarch64 and x86_64 on PyPI).
FASTSAFETENSORS = "fastsafetensors==0.3.3"
# Podman writes OCI images by default, and OCI configs have no HEALTHCHECK: keep Docker's format.
DOCKER_FORMAT = "application/vnd.docker.distribution.manifest.v2+json"


class ApplianceImageError(ApplianceError):
    """An appliance image could not be built."""

    hint = "see the build output above; `appliance image build --target T --dry-run` shows the spec"


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    platform: str  # OCI platform of the image
    base_arg: str  # the Containerfile ARG that names the base image
    python: str  # the base image's python3 (X.Y): the wheelhouse is made for it
    wheel_platform: str | None  # manylinux tag of the wheels; None: this machine's own
    extras: tuple[str, ...] = ()
    vllm_extras: tuple[str, ...] = ()  # pins for vLLM's own Python, installed only if missing
    local_base: bool = False  # the base is the debootstrap image in the service user's store

    @property
    def containerfile(self) -> Path:
        return RECIPES / f"{self.name}.Containerfile"

    @property
    def repository(self) -> str:
        return f"{REPOSITORY_PREFIX}-{self.name}"

    @property
    def default_base(self) -> str:
        return read_recipe(self).args[self.base_arg]


def host_oci_platform() -> str:
    machine = host_platform.machine()
    return {"x86_64": "linux/amd64", "aarch64": "linux/arm64"}.get(machine, f"linux/{machine}")


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            "spark",
            "DGX Spark (GB10, sm_121, CUDA 13): vLLM + the appliance",
            "linux/arm64",
            "VLLM_IMAGE",
            "3.12",
            "manylinux_2_39_aarch64",  # Ubuntu 24.04: glibc 2.39
            vllm_extras=(FASTSAFETENSORS,),
        ),
        Target(
            "rtx",
            "RTX hosts (Blackwell, Ada): vLLM + the appliance",
            "linux/amd64",
            "VLLM_IMAGE",
            "3.12",
            "manylinux_2_39_x86_64",
        ),
        Target(
            "cpu",
            "no GPU: the embedded model + the appliance, on the debootstrap base image",
            host_oci_platform(),  # the wheelhouse is this machine's
            "BASE_IMAGE",
            "3.11",  # Debian bookworm's python3
            None,
            extras=("embedded",),
            local_base=True,
        ),
    )
}


def target_for(host: HostSnapshot, machine: str | None = None) -> str:
    """The image target for a host: `spark` on a DGX Spark (GB10) or any other arm64 GPU host
    (`machine`: platform.machine(), this host's by default), `rtx` on any other GPU host, `cpu`
    without a GPU."""
    if not host.gpus:
        return "cpu"
    return gpu_target(machine, spark=host.host_class == HostClass.DGX_SPARK)


def gpu_target(machine: str | None = None, *, spark: bool = False) -> str:
    """The target of a GPU host: `spark` on a DGX Spark or any arm64 host, else `rtx`."""
    machine = machine or host_platform.machine()
    return "spark" if spark or machine == "aarch64" else "rtx"


def target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise ApplianceImageError(
            f"unknown target {name!r}", hint=f"targets: {', '.join(TARGETS)}"
        ) from None


def read_recipe(t: Target) -> cf.Containerfile:
    return cf.read(t.containerfile)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the spec (data; `--dry-run` prints it) ------------------------------------------------------


@dataclass(frozen=True)
class BuildSpec:
    target: str
    description: str
    containerfile: str  # package path of the recipe
    platform: str
    base: str  # the base image reference (cpu: resolved to its id at build time)
    build_args: dict[str, str]
    labels: dict[str, str]
    tag: str
    context: list[str]
    wheelhouse: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)  # libpod /build query parameters

    def argv(self) -> list[str]:
        """The equivalent `podman build` command line (what the API call does)."""
        argv = ["podman", "build", "--network=none", "--pull=never", "--format=docker"]
        argv += [f"--platform={self.platform}", "--file=Containerfile", f"--tag={self.tag}"]
        argv += [f"--build-arg={k}={v}" for k, v in sorted(self.build_args.items())]
        argv += [f"--label={k}={v}" for k, v in sorted(self.labels.items())]
        return [*argv, "CONTEXT"]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "argv": self.argv()}


def wheel_target(t: Target) -> tuple[str | None, str | None]:
    """(platform, python_version) for build_wheelhouse: None, None means this machine."""
    return (t.wheel_platform, t.python) if t.wheel_platform else (None, None)


def build_spec(
    t: Target, *, base: str | None = None, digest: str | None = None, base_id: str | None = None
) -> BuildSpec:
    """The build as data. Without `digest` the tag and digest labels are placeholders."""
    base = base or t.default_base
    wheel_platform, python_version = wheel_target(t)
    tag = tag_for(t, digest) if digest else f"{t.repository}:<inputs-digest-12>"
    labels = labels_for(t, base, digest or "<inputs-digest>")
    build_args = {t.base_arg: base_id or base}
    context = ["Containerfile", "wheels/requirements.txt", "wheels/*.whl", "tools/pip.whl"]
    if t.vllm_extras:
        context += ["vllm-extras/requirements.txt", "vllm-extras/*.whl"]
    pip_download = download_argv(
        Path("wheels"), platform=wheel_platform, python_version=python_version
    )
    params = {
        "dockerfile": "Containerfile",
        "platform": t.platform,
        "outputformat": DOCKER_FORMAT,
        "pullpolicy": "never",
        "buildargs": json.dumps(build_args, sort_keys=True),
        "labels": json.dumps(labels, sort_keys=True),
    }
    return BuildSpec(
        target=t.name,
        description=t.description,
        containerfile=f"appliance/packaging/recipes/{t.containerfile.name}",
        platform=t.platform,
        base=base,
        build_args=build_args,
        labels=labels,
        tag=tag,
        context=context,
        wheelhouse={
            "extras": list(t.extras),
            "platform": wheel_platform or "this machine",
            "python": t.python,
            "requirements": f"wheels/{REQUIREMENTS_FILE}",
            "deps": ["pip", *pip_download, "-r", f"wheels/{REQUIREMENTS_FILE}"]
            if wheel_platform
            else ["pip", "wheel", "--no-deps", "--prefer-binary", "-w", "wheels", "..."],
            "vllm_extras": list(t.vllm_extras),
        },
        params=params,
    )


def tag_for(t: Target, digest: str) -> str:
    return f"{t.repository}:{digest.removeprefix('sha256:')[:12]}"


def labels_for(t: Target, base: str, digest: str) -> dict[str, str]:
    p = LABEL_PREFIX
    labels = {
        # load_image keeps a layer's own name instead of re-tagging it as the base.
        f"{p}.layer": f"appliance-{t.name}",
        f"{p}.image.target": t.name,
        f"{p}.image.base": base,
        f"{p}.image.platform": t.platform,
        f"{p}.image.python": t.python,
        f"{p}.version": __version__,
        f"{p}.recipe": str(RECIPE_VERSION),
        INPUTS_LABEL: digest,
        # The cpu image inherits the sandbox base's recipe label; blueprints find sandbox images
        # by it, so it must not stay: this image is no sandbox base.
        RECIPE_LABEL: digest,
        "org.opencontainers.image.title": t.repository.rsplit("/", 1)[1],
        "org.opencontainers.image.version": __version__,
    }
    if not t.local_base:
        labels[f"{p}.vllm.min-version"] = MIN_VLLM_VERSION
    return labels


# -- inputs and the cache ----------------------------------------------------------------------


def pip_pin() -> str:
    """pip itself, at the version that builds the wheelhouse here (it installs in the image)."""
    return f"pip=={metadata.version('pip')}"


def inputs(t: Target, base_identity: str) -> dict[str, Any]:
    """Everything the image depends on; its digest names the image."""
    wheel_platform, python_version = wheel_target(t)
    return {
        "recipe": RECIPE_VERSION,
        "target": t.name,
        "containerfile_sha256": _sha256(t.containerfile.read_bytes()),
        "base": base_identity,
        "platform": t.platform,
        "python": t.python,
        "pins": pinned_closure(DIST_NAME, t.extras, env=marker_env(wheel_platform, python_version)),
        "vllm_extras": list(t.vllm_extras),
        "pip": pip_pin(),
        "source": source_digest(),  # the appliance's own code: its wheel is rebuilt from it
    }


def inputs_digest(spec: Mapping[str, Any]) -> str:
    return "sha256:" + _sha256(json.dumps(spec, sort_keys=True).encode())


@dataclass(frozen=True)
class ApplianceImageRef:
    target: str
    tag: str
    inputs_digest: str
    image_id: str
    size: int = 0  # bytes, as podman reports it
    labels: dict[str, str] = field(default_factory=dict)


def find_appliance_image(client: Any, t: Target, digest: str) -> ApplianceImageRef | None:
    tag = tag_for(t, digest)
    img, labels = find_by_inputs(client, tag, digest)
    if img is None:
        return None
    size = int(img.attrs.get("Size") or 0)
    return ApplianceImageRef(t.name, tag, digest, img.id, size, labels)


def dry_run(name: str, base: str | None = None) -> dict[str, Any]:
    """The spec and the inputs known without Podman (the cpu base's id is resolved at build)."""
    t = target(name)
    spec = build_spec(t, base=base)
    wheel_platform, python_version = wheel_target(t)
    pins = pinned_closure(DIST_NAME, t.extras, env=marker_env(wheel_platform, python_version))
    return {
        "spec": spec.as_dict(),
        "pins": pins,
        "pip": pip_pin(),
        "source_digest": source_digest(),
    }


def golden_spec(name: str) -> dict[str, Any]:
    """The spec with nothing host- or code-dependent in it (tests/golden/images/)."""
    return build_spec(target(name)).as_dict()


def describe(ref: ApplianceImageRef) -> str:
    return f"{ref.tag} ({ref.inputs_digest}, {ref.size / 1e6:.0f} MB)"
