"""Doctor checks for what sandboxes stand on: the kernel's confinement features (Landlock,
seccomp, user namespaces) and rootless Podman (the service user's subids, podman, an OCI runtime).
"""

from __future__ import annotations

import errno
import re

from appliance.ops.doctor.env import CheckResult, DoctorEnv, read_text

SUBID_MIN = 65536  # one full 16-bit id range: what a typical image's files are owned by
LANDLOCK_NET_ABI = 4  # first ABI with TCP bind/connect rules (Linux 6.7)


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
    status = read_text(env, "/proc/self/status") or ""
    if not re.search(r"^Seccomp:\s*\d", status, re.MULTILINE):
        return CheckResult(
            name=name, status="fail", detail="no Seccomp field in /proc/self/status", fix=fix
        )
    actions = read_text(env, "/proc/sys/kernel/seccomp/actions_avail")
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
    raw = read_text(env, "/proc/sys/user/max_user_namespaces")
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
    clone = read_text(env, "/proc/sys/kernel/unprivileged_userns_clone")
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
    for line in (read_text(env, absolute) or "").splitlines():
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
    for line in (read_text(env, "/etc/passwd") or "").splitlines():
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
