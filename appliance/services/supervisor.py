"""The appliance's long-running services and the supervisor that keeps them up.

`appliance up` starts one detached supervisor process (`appliance supervise`) when no service
manager is in charge. It runs the control plane (`appliance serve control`), the backend (vLLM or
the embedded model server) and the gateway as child processes, restarts them with backoff when
they die, and records their state in <state_dir>/run/services.json for `appliance status` (with
each service's last restarts and their reasons). `appliance down` sends it SIGTERM. One
supervisor per state dir (run_state.py: its lock, its pid file, the instance id `up` hands it).
Sandboxes are not its concern: the control plane owns and reconciles them (and they outlive
both, as their proxies do).
Under systemd, `appliance serve control|backend|gateway` are the unit commands instead.

The backend runs on the host (the venv's `vllm` or embedded server) or, on the container path
(serving_path), as the foreground `podman run` of the appliance image running the same argv
(inference/backends/container.py): as the service user's rootless Podman when we are root (the
store `appliance image build --target` builds into), else as the invoking user's own Podman.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Literal

import httpx

from appliance.config import ApplianceConfig
from appliance.control.paths import socket_path
from appliance.errors import ConfigError
from appliance.services import run_state
from hardware.plan_types import ServingPlan
from inference.backends import ProcessBackend, Supervisor, VllmBackend
from inference.backends.base import BackendStartError
from inference.backends.container import (
    CACHE_MOUNT,
    ContainerSpec,
    PodmanAccount,
    cache_volume_name,
    container_name,
)
from inference.backends.supervisor import Probe
from inference.gateway.settings import BACKEND_KEY_ENV

log = logging.getLogger(__name__)


def run_dir(config: ApplianceConfig) -> Path:
    return config.state_dir / "run"


def log_dir(config: ApplianceConfig) -> Path:
    return config.state_dir / "logs"


def pid_file(config: ApplianceConfig) -> Path:
    return run_dir(config) / "supervisor.pid"


def services_file(config: ApplianceConfig) -> Path:
    return run_dir(config) / "services.json"


def cli_argv(config: ApplianceConfig, *args: str) -> list[str]:
    """Re-invoke this appliance (same interpreter, same state dir) with `args`."""
    return [sys.executable, "-m", "appliance", "--state-dir", str(config.state_dir), *args]


# The image's venv (appliance/packaging/recipes/*.Containerfile) and the embedded server's
# converted-weights cache on the container's writable cache volume.
IMAGE_PYTHON = "/opt/appliance/venv/bin/python"
CONTAINER_EMBEDDED_CACHE = f"{CACHE_MOUNT}/cache"
ServingPath = Literal["host", "container"]


def serving_path(
    config: ApplianceConfig, plan: ServingPlan, *, recorded: bool = False
) -> ServingPath:
    """Where the backend runs: `container` when the config says so, or when it is `auto`, the
    plan is vLLM and this host has no usable `vllm` (host_vllm). `recorded`: the plan is for a
    recorded host, whose PATH we cannot see: the container."""
    backend = config.inference.backend
    if backend == "container":
        return "container"
    if backend == "auto" and plan.backend == "vllm" and (recorded or host_vllm()[0] is None):
        return "container"
    return "host"


def host_vllm() -> tuple[str | None, str]:
    """The `vllm` on PATH if it is recent enough for the plans (MIN_VLLM_VERSION), else None;
    and why (one line)."""
    from packaging.version import InvalidVersion, Version

    from appliance.packaging.appliance_image import MIN_VLLM_VERSION

    found = shutil.which("vllm")
    if found is None:
        return None, "no vllm on PATH"
    try:
        stamp = os.stat(found)
        text = _vllm_version(found, stamp.st_mtime_ns, stamp.st_size)
        version = Version(text)
    except (OSError, subprocess.TimeoutExpired, InvalidVersion):
        return None, f"{found} --version does not give a version"
    if version < Version(MIN_VLLM_VERSION):
        return None, f"{found} is vLLM {version}, older than {MIN_VLLM_VERSION}"
    return found, f"{found} (vLLM {version})"


@functools.lru_cache(maxsize=8)
def _vllm_version(executable: str, _mtime_ns: int, _size: int) -> str:
    """`vllm --version`'s last line (it imports torch: seconds), once per executable file."""
    out = subprocess.run(
        [executable, "--version"], capture_output=True, text=True, timeout=120, check=False
    )
    return (out.stdout.strip().splitlines() or [""])[-1].strip()


def container_target(config: ApplianceConfig, plan: ServingPlan, machine: str | None = None) -> str:
    """The appliance image target: the configured one, else `cpu` for the embedded model and,
    for vLLM (a GPU host), as target_for: `spark` on arm64 (`machine`), else `rtx`."""
    from appliance.packaging.appliance_image import gpu_target

    if config.inference.container.target is not None:
        return config.inference.container.target
    if plan.backend != "vllm":
        return "cpu"
    return gpu_target(machine)


def container_image(config: ApplianceConfig, target: str) -> str:
    """The configured image, else the local tag `appliance image build --target` gives."""
    return config.inference.container.image or f"localhost/appliance-{target}:latest"


def podman_account(config: ApplianceConfig) -> PodmanAccount:
    """Who runs the backend's podman: root runs the service user's rootless Podman, anyone
    else their own. Read-only (probes, the dry run, doctor): nothing is made."""
    if os.geteuid() != 0:
        return PodmanAccount()
    from sandbox.lifecycle.podman_service import PodmanService

    service = PodmanService(user=config.sandbox.service_user)
    acct = service.account
    return PodmanAccount(uid=acct.pw_uid, gid=acct.pw_gid, env=service.env(), home=acct.pw_dir)


def prepared_podman_account(config: ApplianceConfig) -> PodmanAccount:
    """podman_account() for a real start: the service user's runtime dir made if /run lost it."""
    account = podman_account(config)
    if account.uid is not None:
        from sandbox.lifecycle.podman_service import PodmanService

        PodmanService(user=config.sandbox.service_user).ensure_runtime_dir()
    return account


def remove_backend_container(config: ApplianceConfig, timeout: float = 60.0) -> str | None:
    """`podman rm --force --time=0 --ignore` of this state dir's backend container, as the
    backend's Podman account: what a dead supervisor (or a failed `up`) left behind. Idempotent;
    None when done (or nothing to do), else why not (one line)."""
    if shutil.which("podman") is None:
        return None  # no Podman: no container
    from sandbox.lifecycle.errors import HostNotReady

    try:
        account = podman_account(config)
    except HostNotReady as exc:  # e.g. no service user: nothing of ours can run
        return f"no Podman account for the backend: {exc}"
    argv = account.argv("rm", "--force", "--time=0", "--ignore", container_name(config.state_dir))
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=dict(account.env) if account.env is not None else None,
            cwd=account.home,
            timeout=timeout,
            check=False,
            **account.popen_kwargs(os.geteuid()),  # type: ignore[arg-type]
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{shlex.join(argv)}: {exc}"
    if done.returncode != 0:
        return f"{shlex.join(argv)}: {(done.stderr.strip().splitlines() or ['failed'])[-1]}"
    return None


def backend_container(
    config: ApplianceConfig,
    plan: ServingPlan,
    *,
    account: PodmanAccount | None = None,
    machine: str | None = None,
) -> ContainerSpec:
    target = container_target(config, plan, machine)
    gpu = target != "cpu"
    return ContainerSpec(
        image=container_image(config, target),
        name=container_name(config.state_dir),
        cache_volume=cache_volume_name(config.state_dir),
        gpu=gpu,
        models_dir=config.resolved_models_dir if gpu else None,
        account=account if account is not None else prepared_podman_account(config),
    )


def embedded_argv(
    config: ApplianceConfig, plan: ServingPlan, *, in_container: bool = False
) -> list[str]:
    listen = config.inference.backend_listen
    python = IMAGE_PYTHON if in_container else sys.executable
    # On the host where it always was (the old default models dir: <state_dir>/models/cache,
    # root-only with the state dir: only the supervisor's own process writes it).
    host_cache = (config.models_dir or config.state_dir / "models") / "cache"
    cache = CONTAINER_EMBEDDED_CACHE if in_container else str(host_cache)
    argv = [
        python, "-m", "inference.embedded",
        "--host", listen.host,
        "--port", str(listen.port),
        "--served-model-name", config.inference.served_model_name,
        "--cache-dir", cache,
        "--max-num-seqs", str(plan.max_num_seqs),
        "--max-model-len", str(plan.max_model_len),
    ]  # fmt: skip
    if config.inference.embedded_model:
        if in_container:
            raise ConfigError(
                "inference.embedded_model is a host path or id; the container serves the "
                "image's own embedded model",
                hint="unset inference.embedded_model, or set inference.backend to embedded",
            )
        argv += ["--model", config.inference.embedded_model]
    return argv


def backend_process(
    config: ApplianceConfig,
    plan: ServingPlan,
    *,
    container: ContainerSpec | None = None,
    api_key: str | None = None,
) -> ProcessBackend:
    """The backend service; on the container path (serving_path) in the appliance image
    (`container`: the spec to use, default backend_container()). `api_key`: what vLLM
    requires of every /v1 request (VLLM_API_KEY: env only); the embedded server has no keys."""
    log = log_dir(config) / "backend.log"
    if container is None and serving_path(config, plan) == "container":
        container = backend_container(config, plan)
    if plan.backend == "vllm":
        return VllmBackend(
            plan,
            log_path=log,
            offline=config.inference.offline,
            hf_home=config.resolved_models_dir / "hf",
            api_key=api_key,
            container=container,
        )
    listen = config.inference.backend_listen
    return ProcessBackend(
        embedded_argv(config, plan, in_container=container is not None),
        base_url=f"http://{listen.host}:{listen.port}",
        log_path=log,
        name="embedded",
        env={"HF_HUB_OFFLINE": "1"} if config.inference.offline else None,
        container=container,
        warmup_model=config.inference.served_model_name,
    )


def gateway_process(config: ApplianceConfig, backend_key: str | None = None) -> ProcessBackend:
    """`appliance serve gateway`; `backend_key` reaches it in its environment (BACKEND_KEY_ENV),
    never argv or a file."""
    gw = config.gateway
    return ProcessBackend(
        cli_argv(config, "serve", "gateway"),
        base_url=f"http://{gw.host}:{gw.port}",
        log_path=log_dir(config) / "gateway.log",
        name="gateway",
        health_path="/health/live",
        env={BACKEND_KEY_ENV: backend_key} if backend_key else None,
    )


class ControlProcess(ProcessBackend):
    """`appliance serve control`: its health is asked on its unix socket (the port may be off),
    and a start is refused while another control plane answers there (its bind would unlink
    that one's socket)."""

    def __init__(self, argv: list[str], *, socket: Path, url: str, log_path: Path) -> None:
        super().__init__(argv, base_url=url, log_path=log_path, name="control")
        self.socket = socket

    def _check_port_free(self) -> None:
        if self.probe(timeout=0.5) != "down":
            raise BackendStartError(
                f"control: a control plane already answers on {self.socket}", retryable=True
            )

    def probe(self, timeout: float = 2.0) -> Probe:
        transport = httpx.HTTPTransport(uds=str(self.socket))
        try:
            with httpx.Client(transport=transport, timeout=timeout) as client:
                # Any socket peer may read the API's description: no token, no store query.
                response = client.get("http://control/api/v1/openapi.json")
        except (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout, httpx.ConnectTimeout):
            return "busy"
        except httpx.HTTPError:
            return "down"
        return "ok" if response.status_code == 200 else "unhealthy"


def control_url(config: ApplianceConfig) -> str:
    """Where operators reach the control plane: the web console at its loopback port's root (the
    API is <url>api/v1), or (port off) its socket."""
    control = config.control
    if control.port is None:
        return f"unix:{socket_path(config)}"
    host = f"[{control.host}]" if ":" in control.host else control.host
    return f"http://{host}:{control.port}/"


def control_process(config: ApplianceConfig) -> ControlProcess:
    return ControlProcess(
        cli_argv(config, "serve", "control"),
        socket=socket_path(config),
        url=control_url(config),
        log_path=log_dir(config) / "control.log",
    )


def running_supervisor(config: ApplianceConfig) -> tuple[int, str] | None:
    """The running supervisor's pid and instance id (see run_state), or None (a stale pid file is
    ignored: its process is gone, or nothing holds the supervisor lock any more, so the pid may
    be another process's now)."""
    written = run_state.read_pid_file(pid_file(config))
    if written is None or run_state.supervisor_lock_held(run_dir(config)) is False:
        return None
    try:
        os.kill(written[0], 0)
    except PermissionError:
        pass  # alive, another user's (status run as non-root)
    except OSError:
        return None
    return written


def supervisor_pid(config: ApplianceConfig) -> int | None:
    running = running_supervisor(config)
    return running[0] if running else None


def read_services(config: ApplianceConfig) -> dict[str, Any]:
    try:
        return json.loads(services_file(config).read_text())
    except (OSError, ValueError):
        return {}


class _StateFile:
    """services.json, rewritten atomically on every state change of any service."""

    def __init__(self, path: Path, plan: ServingPlan, instance: str) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.data: dict[str, Any] = {
            "supervisor_pid": os.getpid(),
            "instance": instance,
            "plan": plan.variant,
        }

    def update(
        self,
        name: str,
        proc: ProcessBackend,
        state: str,
        detail: str,
        restarts: list[dict[str, Any]] | None = None,
    ) -> None:
        with self.lock:
            self.data[name] = {
                "state": state,
                "detail": detail,
                "pid": proc.pid,
                "since": time.time(),
                "url": proc.base_url,
                "log": str(proc.log_path),
                "restarts": restarts or [],  # the last few, oldest first, with their reasons
                # the container path: which container runs it (`appliance status` shows it)
                "container": (
                    {"name": proc.container.name, "image": proc.container.image}
                    if proc.container is not None
                    else None
                ),
            }
            run_state.write_atomically(self.path, json.dumps(self.data, indent=2))


def supervise(config: ApplianceConfig, plan: ServingPlan, instance: str | None = None) -> None:
    """Run the services until SIGTERM/SIGINT; restart each when it dies (foreground).

    Raises run_state.AlreadySupervised when another supervisor runs for this state dir."""
    lock = run_state.hold_supervisor_lock(run_dir(config))  # held until this process exits
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    instance = instance or uuid.uuid4().hex
    run_state.write_pid_file(pid_file(config), instance)
    log.info("supervisor %d (instance %s) for %s", os.getpid(), instance, config.state_dir)
    states = _StateFile(services_file(config), plan, instance)
    # vLLM on its loopback port would serve any local user without a key (no keys, budgets or
    # metering): it requires this one, which only the gateway (and the warm-up) is given.
    backend_key = secrets.token_urlsafe(32)
    # The control plane first: the gateway's budget hard stop asks it (and fails closed).
    services = {
        "control": control_process(config),
        "backend": backend_process(config, plan, api_key=backend_key),
        "gateway": gateway_process(config, backend_key),
    }
    supervisors: dict[str, Supervisor] = {}
    try:
        for name, proc in services.items():

            def on_state(state: str, detail: str, name: str = name, proc=proc) -> None:
                sup = supervisors.get(name)
                states.update(name, proc, state, detail, sup.recent_restarts if sup else None)

            def progress(elapsed: float, line: str, name: str = name, proc=proc) -> None:
                # A model load takes minutes: show how far it got, about once a second.
                if int(elapsed) != int(elapsed - 0.25):
                    sup = supervisors.get(name)
                    restarts = sup.recent_restarts if sup else None
                    states.update(name, proc, "starting", f"{elapsed:.0f} s: {line}", restarts)

            supervisors[name] = Supervisor(
                proc,
                on_state=on_state,
                progress=progress,
                ready_timeout=config.inference.ready_timeout_s,
            )
            supervisors[name].start()
        stop.wait()
    finally:
        for sup in reversed(supervisors.values()):
            sup.stop(timeout=60)
        run_state.remove_if_mine(pid_file(config), services_file(config))
        os.close(lock)
