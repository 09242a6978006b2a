"""The commands the steps name: the supervisor `appliance up` starts, the backend it spawns (on
the host or as the `podman run` of the appliance image), the `hf download` of the weights. Argv
lists as the operator would type them from the checkout.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.bringup.model import CONTAINER_ENV, Options, appliance
from appliance.config import ApplianceConfig
from hardware.plan_types import ServingPlan
from hardware.snapshot import HostClass, HostSnapshot

if TYPE_CHECKING:
    from inference.backends.container import ContainerSpec


def machine_of(host: HostSnapshot, *, live: bool) -> str | None:
    """The CPU architecture the image target follows (as target_for): arm64 on a DGX Spark,
    else this host's (None), or for a recorded host, which records none, x86_64."""
    if host.host_class == HostClass.DGX_SPARK:
        return "aarch64"
    return None if live else "x86_64"


def supervisor_argv(config: ApplianceConfig, options: Options) -> list[str]:
    """`appliance up`'s detached supervisor, as the user would type it: the `appliance` entry
    point (up runs the same as `python -m appliance` of its venv); --container reaches it
    through its environment."""
    argv = appliance("--state-dir", str(config.state_dir), "serve", "all")
    argv += ["--instance", "<instance>"]
    return ["env", f"{CONTAINER_ENV}=container", *argv] if options.container else argv


def venv_python() -> str:
    """This interpreter as typed from the checkout (where scripts/appliance-up.sh runs): its
    path relative to the checkout when the venv is in it (.venv/bin/python), else as it is."""
    checkout = Path(__file__).parents[2]
    try:
        return str(Path(sys.executable).relative_to(checkout))
    except ValueError:
        return sys.executable


def serving_container(
    config: ApplianceConfig, host: HostSnapshot, plan: ServingPlan, *, live: bool
) -> ContainerSpec | None:
    """The `podman run` the backend gets on the container path (None: the host path). Who runs
    podman does not change its argv: the account is left unresolved (nothing is touched)."""
    from appliance.services.supervisor import backend_container, serving_path
    from inference.backends.container import PodmanAccount

    if serving_path(config, plan) != "container":
        return None
    machine = machine_of(host, live=live)
    return backend_container(config, plan, account=PodmanAccount(), machine=machine)


def backend_argv(
    config: ApplianceConfig, plan: ServingPlan, container: ContainerSpec | None
) -> list[str]:
    """What the supervisor's backend service spawns (the host's argv, or the `podman run` of the
    image around it), its own variables first (secret-looking values masked)."""
    from appliance.services.supervisor import backend_process
    from hardware.secret_names import has_secret_value, is_secret_name

    # The supervisor makes vLLM's key at each start (VLLM_API_KEY, env only): shown masked.
    key = "made-at-each-start" if plan.backend == "vllm" else None
    proc = backend_process(config, plan, container=container, api_key=key)
    env = [
        f"{k}={'***' if is_secret_name(k) or has_secret_value(v) else v}"
        for k, v in sorted(proc.env.items())
    ]
    argv = [venv_python() if arg == sys.executable else arg for arg in proc.spawn_argv()]
    return [*(["env", *env] if env else []), *argv]


def hf_download_argv(models: Path, model: str) -> list[str]:
    """The `hf download` (huggingface_hub's CLI) equivalent of weights.download(): the same
    files (its allow patterns), the same cache. No HF_HOME=<models>/hf: a token saved there
    (`hf auth login`) would be mounted into the backend's container."""
    from appliance.packaging.weights import ALLOW_PATTERNS, hub_cache

    include = [arg for pattern in ALLOW_PATTERNS for arg in ("--include", pattern)]
    return ["hf", "download", model, *include, "--cache-dir", str(hub_cache(models))]
