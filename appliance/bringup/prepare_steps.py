"""The steps `appliance up` runs before its supervisor starts (appliance/bringup/run.py): the
appliance image, the CDI spec, the model weights. Each a pure function of the facts: done, to
do (with every command it would run) or blocked (with the one-line fix).
"""

from __future__ import annotations

from appliance.bringup.commands import hf_download_argv
from appliance.bringup.facts import Facts
from appliance.bringup.image_facts import ImageFacts
from appliance.bringup.model import GIB, UNKNOWN, Step, appliance, shell_line
from appliance.config import ApplianceConfig
from hardware.plan_types import ServingPlan

CDI_SPEC = "/etc/cdi/nvidia.yaml"
PODMAN_FIX = "run scripts/setup.sh as root (it installs Podman)"
MIN_CDI_PODMAN = (4, 1)  # CDI devices (--device=nvidia.com/gpu=all) arrived in Podman 4.1
PODMAN_CDI_FIX = (
    "upgrade Podman to 4.1 or later (Ubuntu 22.04 ships 3.4, Ubuntu 24.04 ships 4.9), then run "
    "this again"
)
TOOLKIT_FIX = (
    "install nvidia-container-toolkit (NVIDIA's apt repository; the ansible role "
    "appliance_nvidia does it), then run this again"
)


def _short(digest: str | None) -> str:
    return digest.removeprefix("sha256:")[:12] if digest else "no inputs label"


def build_argv(target: str) -> list[str]:
    pull = ["--pull"] if target != "cpu" else []  # the vLLM base; the cpu base is built here
    return appliance("image", "build", "--target", target, *pull)


def image_step(target: str, image: str, configured: bool, facts: Facts) -> Step:
    """Done only when the image to run is there and, for the default tag, is the build of the
    current inputs (after a code change `:latest` is the old code): a build of the same inputs
    again is a lookup. A GPU image whose vLLM base is not in the store (an offline host that
    loaded a bundle) is taken as it is. An operator's configured image must be there."""
    if facts.live and facts.podman is None:
        return Step(
            id="image",
            title=f"appliance image ({target})",
            state="blocked",
            why="podman is not installed",
            commands=[] if configured else [build_argv(target)],
            fix=PODMAN_FIX,
        )
    if not facts.live:
        return image_in_store(target, image, configured, None)
    seen = facts.image or ImageFacts(ref=image, present=None, configured=configured)
    return image_in_store(target, image, configured, seen)


def image_in_store(target: str, image: str, configured: bool, seen: ImageFacts | None) -> Step:
    """The image step once Podman is there (the doctor's serving-path check asks it too, so
    the two agree). `seen`: the probe (image_facts.probe_image); None: a recorded host."""
    build = build_argv(target)
    rebuild = f"`{shell_line(build)}`"
    offline = (
        "offline hosts: `appliance image load ARCHIVE` of an `appliance image save` made on a "
        "connected host"
    )
    base = "on the vLLM image (pulled)" if target != "cpu" else "on a debootstrap base built here"
    step = Step(id="image", title=f"appliance image ({target})", state="todo", why="", commands=[])
    if configured:
        return _configured_image(step, target, image, seen)
    if seen is None:
        step.why = (
            f"{image}: built {base} unless the build of the current inputs (recipe, base, pins, "
            f"this checkout's code) is the one in the store ({UNKNOWN}); {offline}"
        )
        step.commands = [build]
    elif seen.present is None:
        step.why = f"{image}: podman could not say whether it is in the store: built {base}"
        step.commands = [build]
    elif seen.up_to_date:
        step.state = "done"
        step.why = f"{image} is the build of the current inputs ({seen.current_tag})"
    elif seen.current is not None:
        if seen.current_tag_present:
            how = f"{seen.current_tag} of the current inputs is there: a lookup tags it :latest"
        else:
            how = f"the current inputs are built as {seen.current_tag} {base}"
        if seen.present:
            step.why = f"{image} is built from other inputs ({_short(seen.built_from)}); {how}"
        else:
            step.why = f"{image} is not in the store: {how}; {offline}"
        step.commands = [build]
    elif seen.present and target != "cpu":
        step.state = "done"
        step.why = (
            f"{image} is in the store, built from inputs {_short(seen.built_from)}; its vLLM "
            f"base is not (a loaded image is used as it is): after an upgrade {rebuild} "
            f"rebuilds it, or load the new release's image archive"
        )
    else:
        state = "in the store, but not its base" if seen.present else "not in the store"
        step.why = f"{image} is {state}: built {base}; {offline}"
        step.commands = [build]
    return step


def _configured_image(step: Step, target: str, image: str, seen: ImageFacts | None) -> Step:
    """inference.container.image: the operator's image, never built here; it must be there."""
    where = "inference.container.image"
    fix = (
        f"load it into the backend's Podman store (`podman load -i ARCHIVE`, as the service "
        f"user when root), or unset {where} to run localhost/appliance-{target}:latest"
    )
    if seen is None:
        step.why = f"{where} {image}: must be in the store, it is not built here ({UNKNOWN})"
    elif seen.present:
        step.state, step.why = "done", f"{where} {image} is in the store"
    elif seen.present is False:
        step.state, step.why, step.fix = "blocked", f"{where} {image} is not in the store", fix
    else:
        step.why = f"{where} {image}: podman could not say whether it is in the store"
    return step


def _podman_too_old_for_cdi(facts: Facts) -> str | None:
    if facts.podman is None or facts.podman >= MIN_CDI_PODMAN:
        return None
    need = ".".join(map(str, MIN_CDI_PODMAN))
    return (
        f"Podman {facts.podman[0]}.{facts.podman[1]} cannot give the container the GPU: CDI "
        f"devices (--device=nvidia.com/gpu=all) need Podman >= {need}"
    )


def _generate(step: Step, facts: Facts, output: str, why: str) -> Step:
    """`nvidia-ctk cdi generate --output=OUTPUT`: to do as root with the toolkit, else blocked
    with the one-line fix."""
    generate = ["nvidia-ctk", "cdi", "generate", f"--output={output}"]
    step.commands = [generate]
    if facts.nvidia_ctk and not facts.root:
        step.state, step.why = "blocked", f"{why}, and writing {output} needs root"
        step.fix = f"sudo {shell_line(generate)}"
    elif facts.nvidia_ctk:
        step.why = f"{why}: generated with {facts.nvidia_ctk}"
    else:
        step.state, step.why = "blocked", f"{why}, and nvidia-ctk is not installed"
        step.fix = TOOLKIT_FIX
    return step


def cdi_step(facts: Facts, driver: str | None = None) -> Step:
    """The CDI spec the container's --device=nvidia.com/gpu=all resolves through. `driver`: the
    host's driver version (NVML): a spec that does not name it was made for another driver (it
    mounts the old libcuda.so.<version>) and is generated again in its place."""
    step = Step(id="cdi", title="CDI spec (nvidia.com/gpu)", state="todo", why="", commands=[])
    if not facts.live:
        step.why = (
            f"generated when no spec lists nvidia.com/gpu or it names another driver than the "
            f"host's ({UNKNOWN}); needs nvidia-ctk, and Podman >= "
            f"{'.'.join(map(str, MIN_CDI_PODMAN))} to use it"
        )
        step.commands = [["nvidia-ctk", "cdi", "generate", f"--output={CDI_SPEC}"]]
    elif too_old := _podman_too_old_for_cdi(facts):
        step.state, step.why, step.fix = "blocked", too_old, PODMAN_CDI_FIX
    elif facts.cdi_spec and facts.cdi_names_driver is False:
        why = (
            f"{facts.cdi_spec} was made for another driver than this host's {driver} (creating "
            "the container fails on the old libraries it names)"
        )
        _generate(step, facts, facts.cdi_spec, why)
    elif facts.cdi_spec:
        for_driver = f" for driver {driver}" if facts.cdi_names_driver else ""
        step.state, step.why = "done", f"{facts.cdi_spec} lists nvidia.com/gpu{for_driver}"
    else:
        _generate(step, facts, CDI_SPEC, "no CDI spec lists nvidia.com/gpu")
    return step


def weights_step(config: ApplianceConfig, plan: ServingPlan, facts: Facts) -> Step:
    from appliance.packaging.weights import is_hub_id, required_bytes, with_headroom

    models = config.resolved_models_dir
    step = Step(id="weights", title="model weights", state="todo", why="", commands=[])
    if not is_hub_id(plan.model):  # an operator's local directory: used as it is
        present = facts.weights if facts.live else None
        step.state = {True: "done", False: "blocked", None: "todo"}[present]
        step.why = f"{plan.model}: {facts.weights_detail or 'a local directory, used as it is'}"
        step.fix = (
            "point inference.vllm.model at a complete model directory" if present is False else None
        )
        return step
    need = required_bytes(plan)
    wanted = with_headroom(need) if need is not None else None
    size = f"{wanted / GIB:.1f} GiB with headroom" if wanted is not None else "size unknown"
    where = f"{plan.model} ({size}) into {models / 'hf' / 'hub'}"
    how = "downloaded (progress bar, resumable, checksums recorded; as the command below)"
    step.commands = [hf_download_argv(models, plan.model)]
    if not facts.live:
        step.why = f"{where}: free space checked first, then {how} ({UNKNOWN})"
        return step
    if facts.models_unreadable:
        step.state = "blocked"
        step.why = f"the backend's Podman cannot mount the models: {facts.models_unreadable}"
        step.fix = (
            f"`chmod 0755` {models} and the directories above it (the weights are public "
            "data), or set models_dir to a directory the service user can read"
        )
        return step
    if facts.weights:
        step.state, step.commands = "done", []
        step.why = f"{plan.model}: {facts.weights_detail or 'present'}"
        return step
    # A resumed download needs room only for what is not on disk yet (as run.py checks it).
    have = facts.weights_on_disk or 0
    rest = with_headroom(max(0, need - have)) if need is not None else None
    fetched = f", {have / GIB:.1f} GiB of it fetched already" if have else ""
    if rest is not None and facts.free_bytes is not None and facts.free_bytes < rest:
        step.state = "blocked"
        step.why = (
            f"{where}: needs {rest / GIB:.1f} GiB{fetched}, "
            f"only {facts.free_bytes / GIB:.1f} GiB free there"
        )
        step.fix = f"free space on {models}'s filesystem or point models_dir at a larger one"
    else:
        free = f" ({facts.free_bytes / GIB:.1f} GiB free{fetched})" if facts.free_bytes else ""
        step.why = f"{where}{free}: {how}"
    return step
