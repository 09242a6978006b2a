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
from typing import Annotated

import typer

from appliance.cli.context import app_context
from appliance.cli.output import console, err_console
from appliance.config import ApplianceConfig
from appliance.errors import BackendError

SERVICES = ("control", "backend", "gateway")  # what the supervisor runs; `up` waits for each
TimeoutOpt = Annotated[
    float, typer.Option("--timeout", help="Seconds to wait for the services to be ready.")
]


def _spawn_supervisor(config: ApplianceConfig, instance: str) -> subprocess.Popen[bytes]:
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
        )


def _wait_ready(
    config: ApplianceConfig, proc: subprocess.Popen[bytes], instance: str, timeout: float
) -> None:
    from appliance.services.supervisor import log_dir, read_services

    deadline = time.monotonic() + timeout
    with console.status("starting the appliance") as spinner:
        while True:
            services = read_services(config)
            if services.get("instance") != instance:
                services = {}  # a stale file, or not yet written by our supervisor
            states = {name: services.get(name, {}).get("state") for name in SERVICES}
            if all(state == "ready" for state in states.values()):
                return
            # A service that must restart before it was ever ready will not get better by waiting.
            broken = [n for n, s in states.items() if s in ("failed", "restarting")]
            if proc.poll() is not None or broken:
                name = broken[0] if broken else "supervisor"
                log = Path(services.get(name, {}).get("log") or log_dir(config) / f"{name}.log")
                tail = log.read_text(errors="replace")[-1500:] if log.is_file() else ""
                raise BackendError(
                    f"{name} failed to start: {services.get(name, {}).get('detail', '')}\n"
                    f"--- {log} (last lines)\n{tail.strip()}",
                    hint=f"see the logs in {log_dir(config)}",
                )
            if time.monotonic() > deadline:
                raise BackendError(f"not ready after {timeout:.0f} s: {states}")
            detail = services.get("backend", {}).get("detail", "")
            spinner.update(f"backend {states['backend'] or 'starting'} · {detail[:80]}")
            time.sleep(0.5)


def _check_own(config: ApplianceConfig, supervisor: int, instance: str) -> None:
    """What answers on the ports must be this supervisor's children, not a stray server."""
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
        if pid is None or served_by(port, pid) is False:
            raise BackendError(
                f"port {port} is not served by the appliance's {name} (pid {pid})",
                hint=f"find what listens there: `ss -ltnp 'sport = :{port}'`",
            )


def up(ctx: typer.Context, timeout: TimeoutOpt = 1800.0) -> None:
    """Start the control plane, the backend and the gateway under a supervisor and wait until
    each is ready."""
    from appliance.services.run_state import lifecycle_lock
    from appliance.services.supervisor import control_url, run_dir, supervisor_pid

    config = app_context(ctx).config()
    with lifecycle_lock(run_dir(config), timeout, on_wait=err_console.print):
        pid = supervisor_pid(config)
        if pid is not None:
            console.print(f"already up (supervisor pid {pid})")
            return
        started = time.monotonic()
        instance = uuid.uuid4().hex
        proc = _spawn_supervisor(config, instance)
        try:
            _wait_ready(config, proc, instance, timeout)
            _check_own(config, proc.pid, instance)
        except BaseException:
            _stop(config, proc.pid)
            raise
    gw = config.gateway
    console.print(
        f"up in {time.monotonic() - started:.1f} s: inference.local at "
        f"http://{gw.host}:{gw.port}/v1, control plane at {control_url(config)} "
        f"(supervisor pid {proc.pid})",
        markup=False,
    )


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
        if pid is None:
            console.print("not running")
            return
        _stop(config, pid)
    console.print(f"stopped (supervisor pid {pid})")
