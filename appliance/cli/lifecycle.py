"""`appliance up` / `appliance down`: start the supervisor (control plane, backend, gateway) and
stop it.

Both hold the state dir's lifecycle lock (appliance/services/run_state.py) from start to end: a
second `up` or `down` waits for the first, then finds the appliance up (or down), never
half-started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from appliance.cli.context import app_context
from appliance.cli.options import SnapshotOpt
from appliance.cli.output import console, err_console, print_json
from appliance.config import ApplianceConfig
from appliance.errors import BackendError

if TYPE_CHECKING:
    from appliance.bringup.model import Bringup
    from hardware.plan_types import ServingPlan

TimeoutOpt = Annotated[
    float | None,
    typer.Option(
        "--timeout",
        help="Seconds to wait for the services to be ready, a hard limit (default: until the "
        "supervisor says ready or failed, however long the model loads).",
    ),
]
DryRunOpt = Annotated[
    bool,
    typer.Option(
        "--dry-run", help="Print the steps and every command they would run; start nothing."
    ),
]
ContainerOpt = Annotated[
    bool,
    typer.Option(
        "--container",
        help="Serve from the appliance image under Podman (inference.backend container, this run).",
    ),
]
UpJsonOpt = Annotated[bool, typer.Option("--json", help="With --dry-run: the steps as JSON.")]


def _spawn_supervisor(
    config: ApplianceConfig, instance: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`env`: what the supervisor gets on top of ours (--container reaches it that way)."""
    from appliance.services.supervisor import cli_argv, log_dir

    log_dir(config).mkdir(parents=True, exist_ok=True)
    with (log_dir(config) / "supervisor.log").open("ab") as log:
        # A new session: the supervisor outlives this command and its terminal.
        return subprocess.Popen(
            cli_argv(config, "serve", "all", "--instance", instance),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )


def _wait_ready(
    config: ApplianceConfig, proc: subprocess.Popen[bytes], instance: str, timeout: float | None
) -> None:
    from appliance.bringup.wait import ProgressLines, ShowFn, wait_for_verdict
    from appliance.services.supervisor import log_dir, read_services

    def ours() -> dict[str, Any]:
        services = read_services(config)
        # {}: a stale file, or not yet written by our supervisor
        return services if services.get("instance") == instance else {}

    def verdict(show: ShowFn) -> tuple[str | None, dict[str, Any]]:
        return wait_for_verdict(
            ours,
            lambda: proc.poll() is not None,
            show,
            timeout=timeout,
            stall_s=config.inference.ready_timeout_s,
        )

    if console.is_terminal:
        with console.status("starting the appliance") as spinner:
            name, services = verdict(
                lambda states, detail: spinner.update(
                    f"backend {states['backend'] or 'starting'} · {detail[:80]}"
                )
            )
    else:  # a pipe, Ansible, ssh -T: a spinner shows nothing there
        name, services = verdict(ProgressLines(_say))
    if name is None:
        return
    # The log's last lines for context, then the failure as one line (vLLM's out-of-memory
    # detail already says what to do: free GPU memory or plan a smaller model).
    log = Path(services.get(name, {}).get("log") or log_dir(config) / f"{name}.log")
    tail = log.read_text(errors="replace")[-1500:].strip() if log.is_file() else ""
    if tail:
        err_console.print(f"--- {log} (last lines)\n{tail}", markup=False, highlight=False)
    detail = (services.get(name, {}).get("detail") or "").strip()
    exited = f"exited with code {proc.returncode}" if proc.returncode is not None else ""
    why = detail.splitlines()[0] if detail else exited or "no detail recorded"
    raise BackendError(
        f"{name} failed to start: {why}",
        hint=f"its log's last lines are above; every service's log is in {log_dir(config)}",
    )


def _check_own(
    config: ApplianceConfig, supervisor: int, instance: str, backend_pid: int | None = None
) -> None:
    """What answers on the ports must be this supervisor's children, not a stray server.
    `backend_pid`: the backend container's process (its listener is no child of `podman run`)."""
    from appliance.services.listeners import served_by
    from appliance.services.supervisor import read_services, running_supervisor

    if running_supervisor(config) != (supervisor, instance):
        raise BackendError(f"the supervisor (pid {supervisor}) lost its pid file or lock")
    services = read_services(config)
    listen = config.inference.backend_listen
    ports = [("backend", listen.port), ("gateway", config.gateway.port)]
    if config.control.port is not None:
        ports.append(("control", config.control.port))
    for name, port in ports:
        pid = services.get(name, {}).get("pid")
        if name == "backend" and backend_pid is not None:
            pid = backend_pid
        if pid is None or served_by(port, pid) is False:
            raise BackendError(
                f"port {port} is not served by the appliance's {name} (pid {pid})",
                hint=f"find what listens there: `ss -ltnp 'sport = :{port}'`",
            )


def _bring_up_plan(
    ctx: typer.Context, snapshot: Path | None, container: bool
) -> tuple[ApplianceConfig, ServingPlan, Bringup]:
    """The steps for this host (probed) or a recorded one (nothing probed)."""
    from appliance.bringup import facts as host_facts
    from appliance.bringup.commands import serving_container
    from appliance.bringup.model import Options
    from appliance.bringup.steps import plan_steps
    from appliance.cli.plan import current_plan, load_snapshot
    from hardware.telemetry import collect

    flags = {"inference": {"backend": "container"}} if container else {}
    config = app_context(ctx).config(**flags)
    host = load_snapshot(snapshot) if snapshot else collect()
    plan = current_plan(ctx, host, **flags)
    if snapshot:
        facts = host_facts.recorded()
    else:
        spec = serving_container(config, host, plan, live=True)
        facts = host_facts.probe(config, host, plan, image=spec.image if spec else None)
    options = Options(container=container, agent=os.environ.get("APPLIANCE_NO_AGENT") != "1")
    return config, plan, plan_steps(host, config, plan, facts, options)


def up(
    ctx: typer.Context,
    timeout: TimeoutOpt = None,
    dry_run: DryRunOpt = False,
    snapshot: SnapshotOpt = None,
    container: ContainerOpt = False,
    json_out: UpJsonOpt = False,
) -> None:
    """Start the control plane, the backend and the gateway under a supervisor and wait until
    each is ready; first the appliance image, the CDI spec and the weights where the host needs
    them (--dry-run prints every step and command instead)."""
    from appliance.bringup.model import CONTAINER_ENV
    from appliance.bringup.run import (
        container_pid,
        refuse_blocked,
        run_prepare,
        serve_banner,
    )
    from appliance.bringup.steps import render
    from appliance.services.run_state import lifecycle_lock
    from appliance.services.supervisor import control_url, run_dir, supervisor_pid

    if snapshot is not None and not dry_run:
        raise typer.BadParameter(
            "a recorded host is for --dry-run only (nothing runs on it)",
            param_hint="--host-snapshot",
        )
    if json_out and not dry_run:
        raise typer.BadParameter("--json goes with --dry-run", param_hint="--json")
    config, plan, bringup = _bring_up_plan(ctx, snapshot, container)
    if dry_run:
        if json_out:
            print_json(bringup)
        else:
            typer.echo(render(bringup, snapshot), nl=False)
        return
    lock_wait = timeout if timeout is not None else config.inference.ready_timeout_s
    with lifecycle_lock(run_dir(config), lock_wait, on_wait=err_console.print):
        pid = supervisor_pid(config)
        if pid is not None:
            console.print(f"already up (supervisor pid {pid})")
            return
        refuse_blocked(bringup)  # before anything starts: one line and its fix
        started = time.monotonic()
        run_prepare(config, plan, bringup, say=_say)
        _say(serve_banner(bringup))
        instance = uuid.uuid4().hex
        proc = _spawn_supervisor(
            config, instance, {CONTAINER_ENV: "container"} if container else None
        )
        try:
            _wait_ready(config, proc, instance, timeout)
            backend_pid = container_pid(config, plan) if bringup.path == "container" else None
            _check_own(config, proc.pid, instance, backend_pid)
        except BaseException:
            _stop(config, proc.pid)
            _remove_backend_container(config)  # what a killed `podman run` may have left
            raise
    gw = config.gateway
    console.print(
        f"up in {time.monotonic() - started:.1f} s: inference.local at "
        f"http://{gw.host}:{gw.port}/v1, control plane at {control_url(config)} "
        f"(supervisor pid {proc.pid})",
        markup=False,
    )


def _remove_backend_container(config: ApplianceConfig) -> None:
    from appliance.services.supervisor import remove_backend_container

    if why := remove_backend_container(config):
        err_console.print(f"appliance: warning: {why}", markup=False)


def _say(line: str) -> None:
    console.print(line, markup=False, highlight=False, soft_wrap=True)


def _stop(config: ApplianceConfig, pid: int, timeout: float = 60.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            # Reap it if it is our child (up's own failure path), else just poll.
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            pass
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(pid, signal.SIGKILL)


def down(ctx: typer.Context) -> None:
    """Stop the supervisor and with it the control plane, the backend and the gateway."""
    from appliance.services.run_state import lifecycle_lock
    from appliance.services.supervisor import run_dir, supervisor_pid

    config = app_context(ctx).config()
    with lifecycle_lock(run_dir(config), 120.0, on_wait=err_console.print):
        pid = supervisor_pid(config)
        if pid is not None:
            _stop(config, pid)
        # Always: a supervisor killed -9 leaves its backend container running.
        _remove_backend_container(config)
    console.print("not running" if pid is None else f"stopped (supervisor pid {pid})")
