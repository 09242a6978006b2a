"""The bring-up steps as data: a pure function of (host, config, plan, facts, options).

Order: setup, image, cdi, weights, serve, agent, status. Each step lists every command it would
run (argv lists), its state, one line saying why, and for a blocked step the one-line fix.
Which steps there are depends on the path: no GPU and no --container is today's embedded model
on the host (setup, serve, agent, status); --container or a GPU host adds the appliance image,
and a GPU adds the CDI spec and the weights (prepare_steps.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from appliance.bringup.commands import (
    backend_argv,
    machine_of,
    serving_container,
    supervisor_argv,
)
from appliance.bringup.facts import Facts
from appliance.bringup.model import UNKNOWN, Bringup, Options, Step, appliance, shell_line
from appliance.bringup.prepare_steps import cdi_step, image_step, weights_step
from appliance.config import ApplianceConfig
from hardware.plan_types import ServingPlan
from hardware.snapshot import HostSnapshot

if TYPE_CHECKING:
    from inference.backends.container import ContainerSpec

DEMO_AGENT = ("demo", "openclaw", "Reply with the word pong")  # scripts/appliance-up.sh's

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
        steps.append(image_step(target, container.image, configured, facts))
        if container.gpu:
            steps.append(cdi_step(facts, host.driver_version))
    if plan.backend == "vllm":
        steps.append(weights_step(config, plan, facts))
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
