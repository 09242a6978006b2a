"""`appliance serve backend|gateway|control|all`: the foreground commands a service manager
runs."""

from __future__ import annotations

import os

import typer

from appliance.cli.context import app_context
from appliance.cli.output import err_console

app = typer.Typer(help="Run one service in the foreground (for systemd units).")


@app.command("backend")
def backend(ctx: typer.Context) -> None:
    """Serve the planned model: exec `vllm serve ...`, or the embedded model server."""
    from appliance.cli.plan import current_plan
    from appliance.services.supervisor import backend_process

    config = app_context(ctx).config()
    proc = backend_process(config, current_plan(ctx))
    err_console.print(f"exec: {proc.command_line()}")
    argv = proc.spawn_argv()  # the `podman run` around it on the container path
    if proc.container is not None and (user := proc.container.account.popen_kwargs(os.geteuid())):
        os.setgroups([])  # the service user's rootless Podman, as the supervisor runs it
        os.setgid(int(user["group"]))  # type: ignore[call-overload]
        os.setuid(int(user["user"]))  # type: ignore[call-overload]
    os.execvpe(argv[0], argv, proc.spawn_env())


@app.command("backend-cleanup", hidden=True)
def backend_cleanup(ctx: typer.Context) -> None:
    """Remove this state dir's backend container if one is left (the unit's ExecStopPost)."""
    from appliance.services.supervisor import remove_backend_container

    if why := remove_backend_container(app_context(ctx).config()):
        err_console.print(f"appliance: warning: {why}")


@app.command("gateway")
def gateway(ctx: typer.Context) -> None:
    """Serve inference.local (the OpenAI-compatible gateway) on the configured address."""
    from appliance.control.killswitch import control_plane_hooks
    from appliance.store.inference_store import InferenceStore
    from inference.gateway.app import create_app
    from inference.gateway.server import serve

    config = app_context(ctx).config()
    store = InferenceStore(config.state_dir)
    # A sandbox's key exhausting its monthly budget stops that sandbox (`appliance kill NAME`):
    # asked of the control plane, or done directly when none answers (fail closed).
    hooks = control_plane_hooks(config)
    settings = config.gateway_settings()
    api = create_app(settings, store, store, store, store, hooks)
    # uvicorn with the listener's limits: header/body timeouts, connection caps, JSON errors
    serve(api, config.gateway.host, config.gateway.port, settings.limits)


@app.command("control")
def control(ctx: typer.Context) -> None:
    """Serve the control plane's API on <state_dir>/run/control.sock (and control.port)."""
    import logging
    import signal

    from appliance.control.api import create_app
    from appliance.control.paths import lock_path, socket_path
    from appliance.control.plane import ControlPlane
    from appliance.control.server import bind_tcp, bind_unix, hold_lock, server

    # Reconciliation, schedule skips, check-in changes and parking go to control.log.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    config = app_context(ctx).config()
    # One control plane per state dir, for this process's lifetime (released at exit, even on
    # kill -9): a second one refuses here, before it touches the socket.
    hold_lock(lock_path(config))
    plane = ControlPlane(config)
    sockets = [bind_unix(socket_path(config))]
    if config.control.port is not None:
        sockets.append(bind_tcp(config.control.host, config.control.port))
    api = server(create_app(plane), on_exit=plane.stop_scheduling)

    def stop(*_: object) -> None:
        # SIGTERM outside uvicorn's own handler: before it is installed (stop as soon as it
        # starts), and after it has stopped serving (uvicorn re-raises the signal then: the
        # default action would end the process before the agents are parked).
        plane.stop_scheduling()
        api.should_exit = True

    signal.signal(signal.SIGTERM, stop)
    try:
        # The plane's threads: the one reconciler of sandboxes and their proxies (now: after a
        # crash or `kill -9`, what the store says runs is brought back; then every 30 s), the
        # agents' check-ins (their sandboxes fail closed without them) and the scheduler.
        plane.start_threads()
        api.run(sockets=sockets)
    finally:
        plane.shutdown()  # the scheduler stopped, then every running agent parked


@app.command("all", hidden=True)
def supervise_all(
    ctx: typer.Context,
    instance: str = typer.Option(None, "--instance", help="The id `appliance up` checks for."),
) -> None:
    """Run the supervisor in the foreground: backend and gateway, restarted when they die."""
    import logging

    from appliance.cli.plan import current_plan
    from appliance.services.supervisor import supervise
    from appliance.store import open_store

    # State changes, and each restart with its reason, go to stderr: supervisor.log under `up`.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("httpx", "httpcore"):  # one line per health check otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    config = app_context(ctx).config()
    plan = current_plan(ctx)
    with open_store(config.state_dir) as store:
        store.record_plan(plan.backend, plan.model, plan.model_dump(mode="json"))
    supervise(config, plan, instance)
