"""Preflight checks (`appliance doctor`): is this host ready to serve a model and run sandboxes?

Each check is a plain function `(DoctorEnv) -> CheckResult`, listed in CHECKS in display order.
Every non-ok result carries a `fix` the operator can act on. Everything a check reads from the
host goes through DoctorEnv (a filesystem root, `which`, `run`, the Landlock probe), so tests
drive each check against a fake tree instead of the real machine.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import platform
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from appliance.config import ApplianceConfig, ListenConfig
from hardware.snapshot import HostSnapshot

Status = Literal["ok", "warn", "fail", "skip"]
RunFn = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]

SUBID_MIN = 65536  # one full 16-bit id range: what a typical image's files are owned by
DISK_FLOOR_GIB = 10.0  # when the planned model's size is unknown
LANDLOCK_NET_ABI = 4  # first ABI with TCP bind/connect rules (Linux 6.7)
# landlock_create_ruleset is 444 in the generic syscall table, which both arches use.
_LANDLOCK_SYSCALL = {"x86_64": 444, "aarch64": 444, "arm64": 444}
_LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
_GIB = 1024**3


class CheckResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    status: Status
    detail: str
    fix: str | None = None


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; raises OSError (ENOSYS, EOPNOTSUPP...) if unavailable."""
    nr = _LANDLOCK_SYSCALL.get(platform.machine())
    if nr is None or platform.system() != "Linux":
        raise NotImplementedError(f"no Landlock syscall number known for {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION) returns the ABI version.
    ret = libc.syscall(
        ctypes.c_long(nr),
        None,
        ctypes.c_size_t(0),
        ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION),
    )
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(ret)


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    # Never a shell; a short timeout so a wedged binary cannot hang the doctor.
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(list(argv), 124, "", "timed out after 10 s")
    except OSError as exc:  # vanished or not executable between `which` and here
        return subprocess.CompletedProcess(list(argv), 126, "", str(exc))


@dataclass
class DoctorEnv:
    config: ApplianceConfig
    host: HostSnapshot
    root: Path = Path("/")  # where /proc, /sys and /etc are read from (a fake tree in tests)
    which: Callable[[str], str | None] = shutil.which
    run: RunFn = _run
    landlock_abi: Callable[[], int] = landlock_abi
    required_gib: float | None = None  # the planned model's weights on disk; None: unknown
    required_for: str | None = None  # what needs required_gib, for the detail ("super-nvfp4")

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")


CheckFn = Callable[[DoctorEnv], CheckResult]


def _read(env: DoctorEnv, absolute: str) -> str | None:
    try:
        return env.path(absolute).read_text()
    except OSError:
        return None


# ---------------------------------------------------------------- kernel


def check_landlock(env: DoctorEnv) -> CheckResult:
    name = "landlock"
    try:
        abi = env.landlock_abi()
    except NotImplementedError as exc:
        return CheckResult(name=name, status="warn", detail=f"not probed: {exc}")
    except OSError as exc:
        if exc.errno == errno.EOPNOTSUPP:
            return CheckResult(
                name=name,
                status="fail",
                detail="Landlock is built into the kernel but not enabled at boot",
                fix="add landlock to the kernel's lsm= parameter (e.g. lsm=landlock,"
                "<current list from /sys/kernel/security/lsm>) and reboot",
            )
        if exc.errno == errno.ENOSYS:
            return CheckResult(
                name=name,
                status="fail",
                detail="kernel has no Landlock (ENOSYS)",
                fix="boot Linux >= 5.13 built with CONFIG_SECURITY_LANDLOCK=y and "
                "lsm=landlock,... on the kernel command line",
            )
        return CheckResult(
            name=name,
            status="fail",
            detail=f"Landlock probe failed: {exc.strerror or exc}",
            fix="boot Linux >= 5.13 with CONFIG_SECURITY_LANDLOCK=y and lsm=landlock,...",
        )
    if abi < LANDLOCK_NET_ABI:
        return CheckResult(
            name=name,
            status="warn",
            detail=f"ABI {abi}: no TCP bind/connect rules (sandboxes still get no network device)",
            fix=f"upgrade to Linux >= 6.7 for Landlock ABI >= {LANDLOCK_NET_ABI}",
        )
    return CheckResult(name=name, status="ok", detail=f"ABI {abi}")


def check_seccomp(env: DoctorEnv) -> CheckResult:
    name = "seccomp"
    fix = "boot a kernel built with CONFIG_SECCOMP=y and CONFIG_SECCOMP_FILTER=y"
    status = _read(env, "/proc/self/status") or ""
    if not re.search(r"^Seccomp:\s*\d", status, re.MULTILINE):
        return CheckResult(
            name=name, status="fail", detail="no Seccomp field in /proc/self/status", fix=fix
        )
    actions = _read(env, "/proc/sys/kernel/seccomp/actions_avail")
    if actions is None:
        return CheckResult(
            name=name,
            status="fail",
            detail="no /proc/sys/kernel/seccomp/actions_avail (seccomp filters unsupported)",
            fix=fix,
        )
    avail = set(actions.split())
    missing = sorted({"errno", "kill_process"} - avail)
    if missing:
        return CheckResult(
            name=name,
            status="fail",
            detail=f"filter actions missing: {', '.join(missing)}",
            fix="boot Linux >= 4.14 with CONFIG_SECCOMP_FILTER=y",
        )
    return CheckResult(name=name, status="ok", detail="filters with errno and kill_process")


def check_userns(env: DoctorEnv) -> CheckResult:
    name = "user namespaces"
    raw = _read(env, "/proc/sys/user/max_user_namespaces")
    if raw is None:
        return CheckResult(
            name=name,
            status="fail",
            detail="no /proc/sys/user/max_user_namespaces (kernel without CONFIG_USER_NS)",
            fix="boot a kernel built with CONFIG_USER_NS=y",
        )
    try:
        limit = int(raw.strip())
    except ValueError:
        limit = 0
    if limit <= 0:
        return CheckResult(
            name=name,
            status="fail",
            detail=f"user.max_user_namespaces = {raw.strip()}",
            fix="sysctl -w user.max_user_namespaces=15000 (persist it in /etc/sysctl.d/)",
        )
    # Debian-patched kernels have an extra switch for unprivileged user namespaces.
    clone = _read(env, "/proc/sys/kernel/unprivileged_userns_clone")
    if clone is not None and clone.strip() != "1":
        return CheckResult(
            name=name,
            status="fail",
            detail=f"kernel.unprivileged_userns_clone = {clone.strip()}",
            fix="sysctl -w kernel.unprivileged_userns_clone=1 (persist it in /etc/sysctl.d/)",
        )
    return CheckResult(name=name, status="ok", detail=f"max_user_namespaces = {limit}")


# ---------------------------------------------------------------- rootless podman


def _subid_count(env: DoctorEnv, absolute: str, user: str, uid: str) -> int:
    total = 0
    for line in (_read(env, absolute) or "").splitlines():
        parts = line.strip().split(":")
        # Entries name the user or its numeric uid: `appliance:100000:65536`.
        if len(parts) == 3 and parts[0] in (user, uid) and parts[2].isdigit():
            total += int(parts[2])
    return total


def check_service_user(env: DoctorEnv) -> CheckResult:
    name = "service user"
    user = env.config.sandbox.service_user
    subids = f"usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user}"
    uid = None
    for line in (_read(env, "/etc/passwd") or "").splitlines():
        parts = line.split(":")
        if len(parts) >= 3 and parts[0] == user:
            uid = parts[2]
            break
    if uid is None:
        return CheckResult(
            name=name,
            status="fail",
            detail=f"user {user!r} (sandbox.service_user) does not exist",
            fix=f"useradd --system --create-home {user} && {subids}",
        )
    n_uid = _subid_count(env, "/etc/subuid", user, uid)
    n_gid = _subid_count(env, "/etc/subgid", user, uid)
    detail = f"{user} (uid {uid}): {n_uid} subuids, {n_gid} subgids"
    if n_uid < SUBID_MIN or n_gid < SUBID_MIN:
        return CheckResult(
            name=name,
            status="fail",
            detail=f"{detail}; rootless Podman needs >= {SUBID_MIN} of each",
            fix=subids,
        )
    return CheckResult(name=name, status="ok", detail=detail)


_PODMAN_FIX = "apt-get install podman runc uidmap slirp4netns"


def check_podman(env: DoctorEnv) -> CheckResult:
    name = "podman"
    path = env.which("podman")
    if path is None:
        return CheckResult(name=name, status="fail", detail="podman not found", fix=_PODMAN_FIX)
    proc = env.run([path, "--version"])
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", proc.stdout or "")
    if proc.returncode != 0 or match is None:
        err = (proc.stderr or proc.stdout or "").strip().splitlines()
        return CheckResult(
            name=name,
            status="fail",
            detail=f"`podman --version` failed: {err[-1] if err else f'exit {proc.returncode}'}",
            fix=_PODMAN_FIX,
        )
    version = match.group(0)
    if int(match.group(1)) < 4:
        return CheckResult(
            name=name,
            status="fail",
            detail=f"podman {version}; rootless sandboxes need podman >= 4",
            fix="install podman >= 4 (Debian 12 / Ubuntu 24.04 ship it)",
        )
    # Rootless Podman maps the subuid ranges through these setuid helpers.
    missing = [tool for tool in ("newuidmap", "newgidmap") if env.which(tool) is None]
    if missing:
        return CheckResult(
            name=name,
            status="fail",
            detail=f"podman {version}, but {' and '.join(missing)} not found",
            fix="apt-get install uidmap",
        )
    return CheckResult(name=name, status="ok", detail=f"podman {version}")


def check_oci_runtime(env: DoctorEnv) -> CheckResult:
    name = "oci runtime"
    runc = env.which("runc")
    if runc is not None:
        proc = env.run([runc, "--version"])
        first = (proc.stdout or "").strip().splitlines()
        return CheckResult(
            name=name, status="ok", detail=first[0] if proc.returncode == 0 and first else runc
        )
    crun = env.which("crun")
    if crun is None:
        return CheckResult(
            name=name,
            status="fail",
            detail="neither runc nor crun found",
            fix="apt-get install runc",
        )
    # cgroup.controllers at the top of /sys/fs/cgroup means the unified (v2-only) hierarchy.
    if env.path("/sys/fs/cgroup/cgroup.controllers").exists():
        return CheckResult(name=name, status="ok", detail="crun on cgroup v2")
    return CheckResult(
        name=name,
        status="fail",
        detail="only crun, which refuses this host's cgroup v1/hybrid hierarchy",
        fix="apt-get install runc; the appliance then runs podman with --runtime runc",
    )


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
    path = env.which("nvidia-ctk")
    if path is None:
        return CheckResult(
            name=name,
            status="warn",
            detail="nvidia-ctk not found",
            fix="install nvidia-container-toolkit (NVIDIA's apt repository or the offline bundle)",
        )
    return CheckResult(name=name, status="ok", detail=path)


_CDI_DIRS = ("/etc/cdi", "/var/run/cdi", "/run/cdi")


def check_cdi_spec(env: DoctorEnv) -> CheckResult:
    name = "cdi spec"
    if skipped := _no_gpu(env, name):
        return skipped
    for directory in _CDI_DIRS:
        base = env.path(directory)
        for pattern in ("nvidia*.yaml", "nvidia*.json"):
            found = sorted(base.glob(pattern)) if base.is_dir() else []
            if found:
                return CheckResult(name=name, status="ok", detail=f"{directory}/{found[0].name}")
    return CheckResult(
        name=name,
        status="fail",
        detail=f"no nvidia*.yaml or nvidia*.json CDI spec in {', '.join(_CDI_DIRS)}",
        fix="nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml",
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


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(env: DoctorEnv) -> CheckResult:
    name = "model disk space"
    models = env.config.resolved_models_dir
    base = _nearest_existing(models)
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
    base = _nearest_existing(state)
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


# Display order: kernel, rootless Podman, GPU, then this appliance's own resources.
CHECKS: list[tuple[str, CheckFn]] = [
    ("landlock", check_landlock),
    ("seccomp", check_seccomp),
    ("user namespaces", check_userns),
    ("service user", check_service_user),
    ("podman", check_podman),
    ("oci runtime", check_oci_runtime),
    ("nvidia driver", check_nvidia_driver),
    ("container toolkit", check_container_toolkit),
    ("cdi spec", check_cdi_spec),
    ("gateway port", check_gateway_port),
    ("backend port", check_backend_port),
    ("model disk space", check_disk),
    ("state dir", check_state_dir),
]


def run_checks(env: DoctorEnv, checks: Sequence[tuple[str, CheckFn]] = CHECKS) -> list[CheckResult]:
    """Run every check; never raises (a crashing check becomes a failed result)."""
    results: list[CheckResult] = []
    for name, check in checks:
        try:
            results.append(check(env))
        except Exception as exc:  # a doctor that crashes hides every other answer
            results.append(
                CheckResult(
                    name=name,
                    status="fail",
                    detail=f"check crashed: {type(exc).__name__}: {exc}",
                    fix="a bug in this check; report it with the detail above",
                )
            )
    return results


def all_ok(results: Sequence[CheckResult]) -> bool:
    """True when nothing failed (warnings and skips are fine)."""
    return not any(r.status == "fail" for r in results)
