"""Doctor checks for serving a model: the GPU stack (driver, container toolkit, CDI spec) and
this appliance's own resources (its ports, the models' disk space, the state dir).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import shutil
import socket
from collections.abc import Callable

from appliance.bringup.facts import CDI_DIRS, find_cdi_spec, toolkit_path
from appliance.config import ApplianceConfig, ListenConfig
from appliance.ops.doctor.env import CheckFn, CheckResult, DoctorEnv
from appliance.packaging.weights import nearest_existing

DISK_FLOOR_GIB = 10.0  # when the planned model's size is unknown
_GIB = 1024**3


# ---------------------------------------------------------------- GPU


def _no_gpu(env: DoctorEnv, name: str) -> CheckResult | None:
    if env.host.has_gpu:
        return None
    why = env.host.nvml_error or "NVML reported no devices"
    return CheckResult(name=name, status="skip", detail=f"no NVIDIA GPU: {why}")


def check_nvidia_driver(env: DoctorEnv) -> CheckResult:
    name = "nvidia driver"
    if skipped := _no_gpu(env, name):
        return skipped
    host = env.host
    gpus = f"{len(host.gpus)} GPU{'s' if len(host.gpus) != 1 else ''} ({host.gpus[0].name})"
    if host.driver_version is None:
        return CheckResult(
            name=name,
            status="warn",
            detail=f"{gpus}, driver version not reported",
            fix="check the driver with nvidia-smi",
        )
    cuda = f", CUDA {host.cuda_driver_version}" if host.cuda_driver_version else ""
    return CheckResult(name=name, status="ok", detail=f"driver {host.driver_version}{cuda}; {gpus}")


def check_container_toolkit(env: DoctorEnv) -> CheckResult:
    name = "container toolkit"
    if skipped := _no_gpu(env, name):
        return skipped
    path = toolkit_path(env.which)
    if path is None:
        return CheckResult(
            name=name,
            status="warn",
            detail="nvidia-ctk not found",
            fix="install nvidia-container-toolkit (NVIDIA's apt repository or the offline bundle)",
        )
    return CheckResult(name=name, status="ok", detail=path)


def check_cdi_spec(env: DoctorEnv) -> CheckResult:
    name = "cdi spec"
    if skipped := _no_gpu(env, name):
        return skipped
    spec = find_cdi_spec(env.path)
    if spec is not None:
        return CheckResult(name=name, status="ok", detail=spec)
    return CheckResult(
        name=name,
        status="fail",
        detail=f"no nvidia*.yaml or nvidia*.json CDI spec in {', '.join(CDI_DIRS)}",
        fix="nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml",
    )


def check_serving_path(env: DoctorEnv) -> CheckResult:
    """Where the backend runs (the host, or the appliance image under Podman: serving_path) and
    whether it can start there: vLLM or the embedded model's packages, or Podman and the image."""
    import importlib.util

    from appliance.bringup.facts import embedded_modules
    from appliance.bringup.image_facts import probe_image
    from appliance.bringup.model import shell_line
    from appliance.bringup.prepare_steps import image_in_store
    from appliance.services.supervisor import container_image, container_target, serving_path
    from hardware.planner import plan_serving

    name = "serving path"
    plan = env.plan or plan_serving(env.host, env.config.inference.vllm)
    what = "vLLM" if plan.backend == "vllm" else "the embedded model"
    if serving_path(env.config, plan) == "host":
        if plan.backend == "vllm":
            vllm = env.which("vllm")
            if vllm is None:
                return CheckResult(
                    name=name,
                    status="fail",
                    detail="inference.backend is vllm (on the host) but no vllm is on PATH",
                    fix="install vLLM into the venv, or set inference.backend to auto or "
                    "container (vLLM in the appliance image)",
                )
            return CheckResult(name=name, status="ok", detail=f"vLLM on the host ({vllm})")
        missing = [m for m in embedded_modules(env.config) if importlib.util.find_spec(m) is None]
        if missing:
            return CheckResult(
                name=name,
                status="fail",
                detail=f"the embedded model on the host; not installed: {', '.join(missing)}",
                fix="scripts/setup.sh embedded",
            )
        return CheckResult(name=name, status="ok", detail="the embedded model on the host")
    target = container_target(env.config, plan)
    image = container_image(env.config, target)
    if env.which("podman") is None:
        return CheckResult(
            name=name,
            status="fail",
            detail=f"{what} in the appliance image {image}, but podman is not installed",
            fix="run scripts/setup.sh as root (it installs Podman)",
        )
    # The image step's own rule on the same probe: doctor and `appliance up` agree (a `:latest`
    # of older code is rebuilt by up, so it is no "ok" here).
    configured = env.config.inference.container.image is not None
    step = image_in_store(target, image, configured, probe_image(env.config, target, image))
    detail = f"{what} in the appliance image: {step.why}"
    if step.state == "done":
        return CheckResult(name=name, status="ok", detail=detail)
    if step.state == "blocked":
        return CheckResult(name=name, status="fail", detail=detail, fix=step.fix)
    build = f"`{shell_line(step.commands[0])}`" if step.commands else "`appliance up`"
    return CheckResult(
        name=name,
        status="warn",
        detail=detail,
        fix=f"{build} (`appliance up` builds it), or `appliance bundle install BUNDLE` offline",
    )


# ---------------------------------------------------------------- ports, disk, state


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _bind_error(host: str, port: int) -> OSError | None:
    """Try to bind host:port as the service would (no SO_REUSEADDR); None when it is free."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return OSError(errno.EADDRNOTAVAIL, f"cannot resolve {host}: {exc.strerror}")
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        try:
            sock.bind(addr)
        except OSError as exc:
            return exc
    return None


def _port_check(name: str, listen: Callable[[ApplianceConfig], ListenConfig], key: str) -> CheckFn:
    def check(env: DoctorEnv) -> CheckResult:
        cfg = listen(env.config)
        where = f"{cfg.host}:{cfg.port}"
        exposed = not _is_loopback(cfg.host)
        exposed_note = "; not loopback: reachable from the network"
        exposed_fix = f"set {key}.host to 127.0.0.1 unless it must be reachable from other hosts"
        err = _bind_error(cfg.host, cfg.port)
        if err is not None and err.errno == errno.EADDRINUSE:
            return CheckResult(
                name=name,
                status="warn",
                detail=f"{where} in use (by a running appliance?)"
                + (exposed_note if exposed else ""),
                fix="fine if the appliance is already up; otherwise stop the other listener "
                f"or change {key}.port",
            )
        if err is not None:
            return CheckResult(
                name=name,
                status="fail",
                detail=f"cannot bind {where}: {err.strerror or err}",
                fix=f"set {key}.host to an address of this machine and {key}.port to a port "
                "this user may bind (>= 1024 unless root)",
            )
        if exposed:
            return CheckResult(
                name=name,
                status="warn",
                detail=f"{where} free{exposed_note}",
                fix=exposed_fix,
            )
        return CheckResult(name=name, status="ok", detail=f"{where} free")

    return check


check_gateway_port = _port_check("gateway port", lambda c: c.gateway, "gateway")
check_backend_port = _port_check(
    "backend port", lambda c: c.inference.backend_listen, "inference.backend_listen"
)


def check_disk(env: DoctorEnv) -> CheckResult:
    name = "model disk space"
    models = env.config.resolved_models_dir
    base = nearest_existing(models)
    if env.required_gib is None:
        need = DISK_FLOOR_GIB
        wants = f"floor {need:.1f} GiB (model size unknown)"
    else:
        need = env.required_gib
        wants = f"{env.required_for or 'model'} needs {need:.1f} GiB"
    free = shutil.disk_usage(base).free / _GIB
    detail = f"{free:.1f} GiB free at {base}; {wants}"
    fix = f"free space on {base}'s filesystem or point models_dir at a larger one"
    if free < need:
        return CheckResult(name=name, status="fail", detail=detail, fix=fix)
    if free < 2 * need:
        return CheckResult(
            name=name,
            status="warn",
            detail=f"{detail} (less than 2x: no room for a second variant or an update)",
            fix=fix,
        )
    return CheckResult(name=name, status="ok", detail=detail)


def check_state_dir(env: DoctorEnv) -> CheckResult:
    name = "state dir"
    state = env.config.state_dir
    base = nearest_existing(state)
    fix = f"create it for this user (install -d -o $USER {state}) or set state_dir"
    if not base.is_dir():
        return CheckResult(name=name, status="fail", detail=f"{base} is not a directory", fix=fix)
    # Creating a child needs write and search permission on the nearest existing directory.
    if not os.access(base, os.W_OK | os.X_OK):
        return CheckResult(
            name=name, status="fail", detail=f"{base} is not writable by this user", fix=fix
        )
    detail = f"{state} writable" if base == state.absolute() else f"{state} creatable in {base}"
    return CheckResult(name=name, status="ok", detail=detail)
