"""The bring-up steps as data: a pure function of (host, config, plan, facts, options).

Order: setup, image, cdi, weights, serve, agent, status. Each step lists every command it would
run (argv lists), its state, one line saying why, and for a blocked step the one-line fix.
Which steps there are depends on the path: no GPU and no --container is today's embedded model
on the host (setup, serve, agent, status); --container or a GPU host adds the appliance image,
and a GPU adds the CDI spec and the weights.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from appliance.bringup.facts import Facts
from appliance.config import ApplianceConfig
from hardware.plan_types import ServingPlan
from hardware.snapshot import HostClass, HostSnapshot

if TYPE_CHECKING:
    from inference.backends.container import ContainerSpec

StepState = Literal["todo", "done", "blocked", "skip"]

GIB = 1024**3
CDI_SPEC = "/etc/cdi/nvidia.yaml"
DEMO_AGENT = ("demo", "openclaw", "Reply with the word pong")  # scripts/appliance-up.sh's
TOOLKIT_FIX = (
    "install nvidia-container-toolkit (NVIDIA's apt repository, or the offline bundle: "
    "`appliance bundle install BUNDLE`), then run this again"
)
CONTAINER_ENV = "APPLIANCE_INFERENCE__BACKEND"  # how --container reaches the supervisor
UNKNOWN = "recorded host: not probed"


class Step(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    title: str
    state: StepState
    why: str  # one line
    commands: list[list[str]] = Field(default_factory=list)  # every command it would run
    fix: str | None = None  # one line, when blocked


class Bringup(BaseModel):
    """What `appliance up` would do on this host (or a recorded one), step by step."""

    model_config = ConfigDict(extra="forbid")

    host: str  # the host class, as the snapshot names it
    recorded: bool  # a recorded host: every fact unknown
    path: Literal["host", "container"]  # where the backend runs
    backend: Literal["vllm", "embedded"]
    variant: str
    model: str
    target: str | None  # the appliance image's target (container path)
    image: str | None
    embedded_on_host: bool  # scripts/appliance-up.sh runs `setup.sh embedded` only then
    environment: str  # Podman/systemd, and the Quadlet alternative where it applies
    steps: list[Step]

    def step(self, step_id: str) -> Step | None:
        return next((s for s in self.steps if s.id == step_id), None)

    def blocked(self) -> list[Step]:
        return [s for s in self.steps if s.state == "blocked"]


@dataclass(frozen=True)
class Options:
    container: bool = False  # --container: inference.backend container for this run
    agent: bool = True  # False: APPLIANCE_NO_AGENT=1


def shell_line(argv: list[str]) -> str:
    return shlex.join(argv)


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

    proc = backend_process(config, plan, container=container)
    env = [
        f"{k}={'***' if is_secret_name(k) or has_secret_value(v) else v}"
        for k, v in sorted(proc.env.items())
    ]
    argv = [venv_python() if arg == sys.executable else arg for arg in proc.spawn_argv()]
    return [*(["env", *env] if env else []), *argv]


def appliance(*args: str) -> list[str]:
    return ["appliance", *args]


# ---------------------------------------------------------------- the steps


def _setup(plan_embedded_on_host: bool, facts: Facts) -> Step:
    commands = [["scripts/setup.sh"]]
    if plan_embedded_on_host:
        commands.append(["scripts/setup.sh", "embedded"])
        what = "the venv with the embedded model's packages (torch, transformers, gguf)"
    else:
        what = "the venv (base packages: the backend's own packages are in the image)"
    if not facts.live:
        return Step(id="setup", title="set up", state="todo", why=what, commands=commands)
    if plan_embedded_on_host and not facts.embedded_installed:
        return Step(
            id="setup",
            title="set up",
            state="blocked",
            why="the embedded model's packages are not installed in this venv",
            commands=commands,
            fix="run `scripts/setup.sh embedded` (scripts/appliance-up.sh does)",
        )
    why = f"{what}: installed"
    return Step(id="setup", title="set up", state="done", why=why, commands=commands)


def _short(digest: str | None) -> str:
    return digest.removeprefix("sha256:")[:12] if digest else "no inputs label"


def _image(target: str, image: str, configured: bool, facts: Facts) -> Step:
    """Done only when the image to run is there and, for the default tag, is the build of the
    current inputs (after a code change `:latest` is the old code): a build of the same inputs
    again is a lookup. A GPU image whose vLLM base is not in the store (an offline host that
    loaded a bundle) is taken as it is. An operator's configured image must be there."""
    pull = ["--pull"] if target != "cpu" else []  # the vLLM base; the cpu base is built here
    build = appliance("image", "build", "--target", target, *pull)
    rebuild = f"`{shell_line(build)}`"
    offline = "offline hosts: `appliance bundle install BUNDLE` loads it instead"
    base = "on the vLLM image (pulled)" if target != "cpu" else "on a debootstrap base built here"
    step = Step(id="image", title=f"appliance image ({target})", state="todo", why="", commands=[])
    seen = facts.image
    if configured:
        return _configured_image(step, target, image, facts)
    if not facts.live:
        step.why = (
            f"{image}: built {base} unless the build of the current inputs (recipe, base, pins, "
            f"this checkout's code) is the one in the store ({UNKNOWN}); {offline}"
        )
        step.commands = [build]
    elif facts.podman is None:
        step.state, step.why = "blocked", "podman is not installed"
        step.fix = "run scripts/setup.sh as root (it installs Podman)"
        step.commands = [build]
    elif seen is None or seen.present is None:
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
            f"base is not (an offline bundle's image is used as it is): after an upgrade "
            f"{rebuild} rebuilds it, or install the new release's bundle"
        )
    else:
        state = "in the store, but not its base" if seen.present else "not in the store"
        step.why = f"{image} is {state}: built {base}; {offline}"
        step.commands = [build]
    return step


def _configured_image(step: Step, target: str, image: str, facts: Facts) -> Step:
    """inference.container.image: the operator's image, never built here; it must be there."""
    where = "inference.container.image"
    fix = (
        f"load it into the backend's Podman store (`podman load -i ARCHIVE`, as the service "
        f"user when root), or unset {where} to run localhost/appliance-{target}:latest"
    )
    seen = facts.image
    if not facts.live:
        step.why = f"{where} {image}: must be in the store, it is not built here ({UNKNOWN})"
    elif facts.podman is None:
        step.state, step.why = "blocked", "podman is not installed"
        step.fix = "run scripts/setup.sh as root (it installs Podman)"
    elif seen is not None and seen.present:
        step.state, step.why = "done", f"{where} {image} is in the store"
    elif seen is not None and seen.present is False:
        step.state, step.why, step.fix = "blocked", f"{where} {image} is not in the store", fix
    else:
        step.why = f"{where} {image}: podman could not say whether it is in the store"
    return step


def _cdi(facts: Facts) -> Step:
    generate = ["nvidia-ctk", "cdi", "generate", f"--output={CDI_SPEC}"]
    step = Step(id="cdi", title="CDI spec (nvidia.com/gpu)", state="todo", why="", commands=[])
    if not facts.live:
        step.why = f"generated when no spec lists nvidia.com/gpu ({UNKNOWN}); needs nvidia-ctk"
        step.commands = [generate]
    elif facts.cdi_spec:
        step.state, step.why = "done", f"{facts.cdi_spec} lists nvidia.com/gpu"
    elif facts.nvidia_ctk and not facts.root:
        step.state = "blocked"
        step.why = f"no CDI spec lists nvidia.com/gpu, and writing {CDI_SPEC} needs root"
        step.fix = f"sudo {shell_line(generate)}"
        step.commands = [generate]
    elif facts.nvidia_ctk:
        step.why = f"no CDI spec lists nvidia.com/gpu: generated with {facts.nvidia_ctk}"
        step.commands = [generate]
    else:
        step.state = "blocked"
        step.why = "no CDI spec lists nvidia.com/gpu, and nvidia-ctk is not installed"
        step.fix = TOOLKIT_FIX
        step.commands = [generate]
    return step


def hf_download_argv(models: Path, model: str) -> list[str]:
    """The `hf download` (huggingface_hub's CLI) equivalent of weights.download(): the same
    files (its allow patterns), the same cache; HF_HOME=<models>/hf is where its token lives."""
    from appliance.packaging.weights import ALLOW_PATTERNS, hub_cache

    include = [arg for pattern in ALLOW_PATTERNS for arg in ("--include", pattern)]
    hf = ["hf", "download", model, *include, "--cache-dir", str(hub_cache(models))]
    return ["env", f"HF_HOME={models / 'hf'}", *hf]


def _weights(config: ApplianceConfig, plan: ServingPlan, facts: Facts) -> Step:
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


def _serve(
    config: ApplianceConfig,
    plan: ServingPlan,
    container: ContainerSpec | None,
    facts: Facts,
    options: Options,
) -> Step:
    where = "in the appliance image under Podman" if container else "on the host"
    what = "vLLM" if plan.backend == "vllm" else "the embedded model"
    commands = [supervisor_argv(config, options), backend_argv(config, plan, container)]
    if facts.live and facts.supervisor_pid is not None:
        why = f"already up (supervisor pid {facts.supervisor_pid})"
        return Step(id="serve", title="serve", state="done", why=why, commands=commands)
    why = (
        f"the supervisor runs the control plane, the gateway and {what} {where}; "
        "ready after the model loads (progress shown) and one warm-up request"
    )
    return Step(id="serve", title="serve", state="todo", why=why, commands=commands)


def _agent(facts: Facts, options: Options) -> Step:
    name, blueprint, ask = DEMO_AGENT
    commands = [
        appliance("agent", "create", name, "--blueprint", blueprint),
        appliance("agent", "run", name, ask),
    ]
    step = Step(id="agent", title="demo agent", state="todo", why="", commands=commands)
    if not options.agent:
        step.state, step.why = "skip", "APPLIANCE_NO_AGENT=1"
    elif facts.live and not facts.root:
        step.state, step.why = "skip", "not root: sandboxes are created by root"
    else:
        step.why = (
            "OpenClaw in its sandbox (created if missing), asked one thing through "
            "inference.local; root only, APPLIANCE_NO_AGENT=1 skips it"
        )
    return step


def environment_line(facts: Facts, image: str | None) -> str:
    """Podman and systemd here, and the units systemd could run instead of `appliance up`: the
    Quadlet files of the appliance image (container path), the venv's units (host path)."""
    from appliance.services.quadlet import MIN_PODMAN

    need = f"{MIN_PODMAN[0]}.{MIN_PODMAN[1]}"
    if image is None:
        units = "`appliance units render` (the same services as systemd units)"
        if not facts.live:
            return (
                f"Podman and systemd: {UNKNOWN}; under systemd, {units} instead of `appliance up`"
            )
        if facts.systemd:
            return f"systemd: {units} is the alternative to `appliance up`"
        return "no systemd: `appliance up` supervises the services itself"
    quadlet = f"`appliance units render --container {image}`"
    if not facts.live:
        return (
            f"Podman and systemd: {UNKNOWN}; where Podman >= {need} and systemd run, {quadlet} "
            "is the systemd-managed alternative to `appliance up`"
        )
    podman = f"Podman {facts.podman[0]}.{facts.podman[1]}" if facts.podman else "no Podman"
    systemd = "systemd" if facts.systemd else "no systemd"
    if facts.podman and facts.podman >= MIN_PODMAN and facts.systemd:
        return f"{podman}, {systemd}: {quadlet} is the systemd-managed alternative"
    return f"{podman}, {systemd}: no Quadlet units here (they need Podman >= {need} and systemd)"


def plan_steps(
    host: HostSnapshot,
    config: ApplianceConfig,
    plan: ServingPlan,
    facts: Facts,
    options: Options,
) -> Bringup:
    """The steps for this host (`config` with --container already folded in: inference.backend
    container; `plan`: the planner's for this host and config)."""
    container = serving_container(config, host, plan, live=facts.live)
    embedded_on_host = container is None and plan.backend == "embedded"
    target = None
    if container is not None:
        from appliance.services.supervisor import container_target

        target = container_target(config, plan, machine_of(host, live=facts.live))
    steps = [_setup(embedded_on_host, facts)]
    if container is not None and target is not None:
        configured = config.inference.container.image is not None
        steps.append(_image(target, container.image, configured, facts))
        if container.gpu:
            steps.append(_cdi(facts))
    if plan.backend == "vllm":
        steps.append(_weights(config, plan, facts))
    steps += [
        _serve(config, plan, container, facts, options),
        _agent(facts, options),
        Step(
            id="status",
            title="status",
            state="todo",
            why="the services, the plan, GPU and backend figures",
            commands=[appliance("status")],
        ),
    ]
    return Bringup(
        host=host.host_class.value,
        recorded=not facts.live,
        path="container" if container else "host",
        backend=plan.backend,
        variant=plan.variant,
        model=plan.model,
        target=target,
        image=container.image if container else None,
        embedded_on_host=embedded_on_host,
        environment=environment_line(facts, container.image if container else None),
        steps=steps,
    )


def render(bringup: Bringup, source: Path | None = None) -> str:
    """The dry run as text: a header, then each step with its commands (one per line)."""
    where = f"recorded host {source.name}" if source else "this host"
    if bringup.path == "container":
        runs = f"in the appliance image {bringup.image} (target {bringup.target})"
    else:
        runs = "on the host"
    lines = [
        f"{where}: {bringup.host}; {bringup.backend} {bringup.variant} ({bringup.model}) {runs}",
        bringup.environment,
        "",
    ]
    for n, step in enumerate(bringup.steps, 1):
        lines.append(f"{n}. {step.title} [{step.state}]: {step.why}")
        lines += [f"   $ {shell_line(argv)}" for argv in step.commands]
        if step.fix:
            lines.append(f"   fix: {step.fix}")
    return "\n".join(lines) + "\n"
