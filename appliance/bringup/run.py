"""Running the steps `appliance up` owns before its supervisor starts: the appliance image, the
CDI spec and the weights. Setup is scripts/setup.sh's, the agent and status the script's; serve
is `appliance up`'s own supervisor start (appliance/cli/lifecycle.py).

Nothing here leaves anything running: a blocked step stops the whole run before the first step
does anything, and each step that runs either completes or raises (one line and a fix).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from appliance.bringup.model import GIB, Bringup, Step, shell_line
from appliance.config import ApplianceConfig
from appliance.errors import ApplianceError, PreflightError
from hardware.plan_types import ServingPlan

Say = Callable[[str], None]
PREPARE = ("image", "cdi", "weights")  # what runs before the supervisor


def refuse_blocked(bringup: Bringup) -> None:
    """The first blocked step as one line and its fix, before anything was started."""
    for step in bringup.blocked():
        raise PreflightError(f"{step.title}: {step.why}", hint=step.fix or PreflightError.hint)


def _child_error(lines: list[str]) -> tuple[str | None, str | None]:
    """An appliance child's own `appliance: error: ...` and `hint: ...` lines, if it printed
    them (its one-line error is ours)."""
    message = hint = None
    for line in lines:
        text = line.strip()
        if text.startswith("appliance: error: "):
            message, hint = text.removeprefix("appliance: error: "), None
        elif text.startswith("hint: ") and message is not None:
            hint = text.removeprefix("hint: ")
    return message, hint


def run_command(config: ApplianceConfig, argv: list[str], say: Say, *, title: str) -> None:
    """Run one of a step's commands in the foreground, its output shown as it comes. An
    `appliance ...` command runs as this appliance (same interpreter and state dir)."""
    from appliance.services.supervisor import cli_argv

    real = cli_argv(config, *argv[1:]) if argv[0] == "appliance" else argv
    seen: list[str] = []
    try:
        proc = subprocess.Popen(
            real,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
    except OSError as exc:
        raise PreflightError(
            f"{title}: cannot run {argv[0]}: {exc.strerror or exc}", hint=f"`{shell_line(argv)}`"
        ) from None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line.rstrip("\n"))
            del seen[:-40]
            say(f"    {line.rstrip()}")
        code = proc.wait()
    except BaseException:  # Ctrl-C: the child is in our process group and got it too
        proc.kill()
        proc.wait()
        raise
    if code != 0:
        message, hint = _child_error(seen)
        raise ApplianceError(
            f"{title}: {message or f'`{shell_line(argv)}` exited with {code}'}",
            hint=hint or "see its output above",
        )


def _image(config: ApplianceConfig, step: Step, say: Say) -> None:
    for argv in step.commands:
        run_command(config, argv, say, title=step.title)


def _cdi(config: ApplianceConfig, step: Step, say: Say) -> None:
    for argv in step.commands:
        run_command(config, argv, say, title=step.title)
    output = next((a for a in step.commands[-1] if a.startswith("--output=")), "")
    spec = Path(output.removeprefix("--output="))
    try:
        ok = "nvidia.com/gpu" in spec.read_text(errors="replace")
    except OSError:
        ok = False
    if not ok:
        raise PreflightError(
            f"{step.title}: {spec} was written but lists no nvidia.com/gpu device",
            hint="check the driver with nvidia-smi, then `nvidia-ctk cdi list`",
        )


def _weights(config: ApplianceConfig, plan: ServingPlan, step: Step, say: Say) -> None:
    from appliance.packaging.weights import bytes_on_disk, check_disk, download, required_bytes

    models = config.resolved_models_dir
    need = required_bytes(plan)
    if need is not None:
        # A resumed download needs room only for what is not on disk yet (download() checks
        # the exact remainder the Hub lists again).
        rest = max(0, need - bytes_on_disk(models, plan.model))
        check_disk(models, rest)  # PreflightError: one line and the fix
        say(f"    disk: room for {rest / GIB:.1f} GiB at {models}")
    path = download(plan.model, models, progress=True)
    say(f"    {plan.model}: {path}")


def _weights_present(config: ApplianceConfig, plan: ServingPlan) -> None:
    from appliance.packaging.weights import download

    download(plan.model, config.resolved_models_dir, progress=False)


def run_prepare(config: ApplianceConfig, plan: ServingPlan, bringup: Bringup, say: Say) -> None:
    """Run the image, CDI and weights steps that are to do, in order, each announced."""
    refuse_blocked(bringup)
    numbered = [s for s in bringup.steps if s.id in (*PREPARE, "serve")]
    for n, step in enumerate(numbered, 1):
        if step.id == "serve":
            return
        say(f"[{n}/{len(numbered)}] {step.title} [{step.state}]: {step.why}")
        if step.state == "done" and step.id == "weights":
            # Put there by a bundle, `hf download` or under umask 077: download() finds them
            # (no network) and opens their modes up, for the image's user reads them.
            _weights_present(config, plan)
        if step.state != "todo":
            continue
        if step.id == "image":
            _image(config, step, say)
        elif step.id == "cdi":
            _cdi(config, step, say)
        elif step.id == "weights":
            _weights(config, plan, step, say)


def serve_banner(bringup: Bringup) -> str:
    numbered = [s for s in bringup.steps if s.id in (*PREPARE, "serve")]
    serve = numbered[-1]
    return f"[{len(numbered)}/{len(numbered)}] {serve.title}: {serve.why}"


def container_pid(config: ApplianceConfig, plan: ServingPlan) -> int | None:
    """The host pid of the backend container's first process, which listens on the backend port
    (conmon is its parent, not `podman run`); None when podman cannot say."""
    from appliance.services.supervisor import backend_container

    spec = backend_container(config, plan)
    argv = spec.podman_argv("inspect", "--format", "{{.State.Pid}}", spec.name)
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env=spec.process_env(os.environ, {}),
            cwd=spec.account.home,
            **spec.account.popen_kwargs(os.geteuid()),  # type: ignore[arg-type]
        )
        pid = int(done.stdout.strip())
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None
    return pid if pid > 0 else None
