"""The doctor's sandbox-host checks against a fake host tree (tests/unit/doctor_host.py):
Landlock, seccomp, user namespaces, the service user's subids, rootless Podman and its OCI
runtime; each one's ok path and its failure path, with a fix."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from appliance.ops.doctor import DoctorEnv, sandbox_host
from tests.unit.doctor_host import (
    FakeRun,
    doctor_env,
    failing_probe,
    healthy_root,
    which_only,
    write_file,
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A healthy host: seccomp, user namespaces, the service user with subids, cgroup v2."""
    return healthy_root(tmp_path)


@pytest.fixture
def env(root: Path, tmp_path: Path) -> DoctorEnv:
    return doctor_env(root, tmp_path)


# ---------------------------------------------------------------- landlock


def test_landlock_ok(env: DoctorEnv) -> None:
    r = sandbox_host.check_landlock(env)
    assert (r.status, r.detail) == ("ok", "ABI 7")


def test_landlock_enosys_fails_with_kernel_fix(env: DoctorEnv) -> None:
    env.landlock_abi = failing_probe(errno.ENOSYS)
    r = sandbox_host.check_landlock(env)
    assert r.status == "fail"
    assert "CONFIG_SECURITY_LANDLOCK=y" in (r.fix or "")
    assert "lsm=landlock" in (r.fix or "")


def test_landlock_disabled_at_boot_fails(env: DoctorEnv) -> None:
    env.landlock_abi = failing_probe(errno.EOPNOTSUPP)
    r = sandbox_host.check_landlock(env)
    assert r.status == "fail"
    assert "not enabled" in r.detail
    assert "lsm=" in (r.fix or "")


def test_landlock_without_network_rules_warns(env: DoctorEnv) -> None:
    env.landlock_abi = lambda: 3
    r = sandbox_host.check_landlock(env)
    assert r.status == "warn"
    assert "ABI 3" in r.detail


# ---------------------------------------------------------------- seccomp, userns


def test_seccomp_ok(env: DoctorEnv) -> None:
    assert sandbox_host.check_seccomp(env).status == "ok"


def test_seccomp_without_status_field_fails(env: DoctorEnv, root: Path) -> None:
    write_file(root, "/proc/self/status", "Name:\tpython\n")
    r = sandbox_host.check_seccomp(env)
    assert r.status == "fail"
    assert "CONFIG_SECCOMP" in (r.fix or "")


def test_seccomp_without_errno_action_fails(env: DoctorEnv, root: Path) -> None:
    write_file(root, "/proc/sys/kernel/seccomp/actions_avail", "kill_thread trap allow\n")
    r = sandbox_host.check_seccomp(env)
    assert r.status == "fail"
    assert "errno, kill_process" in r.detail


def test_userns_ok(env: DoctorEnv) -> None:
    assert sandbox_host.check_userns(env).status == "ok"


def test_userns_zero_fails_naming_the_sysctl(env: DoctorEnv, root: Path) -> None:
    write_file(root, "/proc/sys/user/max_user_namespaces", "0\n")
    r = sandbox_host.check_userns(env)
    assert r.status == "fail"
    assert "user.max_user_namespaces" in (r.fix or "")


def test_userns_debian_switch_off_fails(env: DoctorEnv, root: Path) -> None:
    write_file(root, "/proc/sys/kernel/unprivileged_userns_clone", "0\n")
    r = sandbox_host.check_userns(env)
    assert r.status == "fail"
    assert "kernel.unprivileged_userns_clone=1" in (r.fix or "")
    write_file(root, "/proc/sys/kernel/unprivileged_userns_clone", "1\n")
    assert sandbox_host.check_userns(env).status == "ok"


# ---------------------------------------------------------------- service user


def test_service_user_ok(env: DoctorEnv) -> None:
    r = sandbox_host.check_service_user(env)
    assert r.status == "ok"
    assert r.detail == "appliance (uid 999): 65536 subuids, 65536 subgids"


def test_service_user_missing_fails_with_useradd(env: DoctorEnv) -> None:
    env.config.sandbox.service_user = "agents"  # the fix names the configured user
    r = sandbox_host.check_service_user(env)
    assert r.status == "fail"
    assert "sandbox.service_user" in r.detail
    assert (r.fix or "").startswith("useradd --system --create-home agents && usermod ")
    assert (r.fix or "").endswith(" agents")


def test_service_user_too_few_subuids_fails(env: DoctorEnv, root: Path) -> None:
    write_file(root, "/etc/subuid", "appliance:100000:1000\n")
    r = sandbox_host.check_service_user(env)
    assert r.status == "fail"
    assert "1000 subuids" in r.detail
    assert r.fix == ("usermod --add-subuids 100000-165535 --add-subgids 100000-165535 appliance")


def test_service_user_ranges_add_up(env: DoctorEnv, root: Path) -> None:
    write_file(
        root, "/etc/subuid", "appliance:100000:32768\nother:1:65536\nappliance:200000:32768\n"
    )
    assert sandbox_host.check_service_user(env).status == "ok"


# ---------------------------------------------------------------- podman, runtime


def test_podman_ok_reports_version(env: DoctorEnv) -> None:
    r = sandbox_host.check_podman(env)
    assert (r.status, r.detail) == ("ok", "podman 4.9.3")
    assert env.run.calls == [["/usr/bin/podman", "--version"]]  # type: ignore[attr-defined]


def test_podman_missing_fails_with_apt_fix(env: DoctorEnv) -> None:
    env.which = which_only("runc")
    r = sandbox_host.check_podman(env)
    assert r.status == "fail"
    assert r.fix == "apt-get install podman runc uidmap slirp4netns"


def test_podman_3_fails(env: DoctorEnv) -> None:
    env.run = FakeRun({"podman": "podman version 3.4.4\n"})
    r = sandbox_host.check_podman(env)
    assert r.status == "fail"
    assert ">= 4" in r.detail


def test_podman_without_newuidmap_fails(env: DoctorEnv) -> None:
    env.which = which_only("podman")
    r = sandbox_host.check_podman(env)
    assert r.status == "fail"
    assert r.fix == "apt-get install uidmap"


def test_runc_ok(env: DoctorEnv) -> None:
    r = sandbox_host.check_oci_runtime(env)
    assert (r.status, r.detail) == ("ok", "runc version 1.1.12")


def test_crun_only_on_hybrid_cgroups_fails(env: DoctorEnv, root: Path) -> None:
    (root / "sys/fs/cgroup/cgroup.controllers").unlink()
    write_file(root, "/sys/fs/cgroup/unified/cgroup.controllers", "")  # the hybrid layout
    env.which = which_only("crun")
    r = sandbox_host.check_oci_runtime(env)
    assert r.status == "fail"
    assert "--runtime runc" in (r.fix or "")


def test_crun_only_on_cgroup_v2_ok(env: DoctorEnv) -> None:
    env.which = which_only("crun")
    assert sandbox_host.check_oci_runtime(env).status == "ok"


def test_no_runtime_fails(env: DoctorEnv) -> None:
    env.which = which_only()
    r = sandbox_host.check_oci_runtime(env)
    assert r.status == "fail"
    assert r.fix == "apt-get install runc"


def test_podman_version_failure_fails(env: DoctorEnv) -> None:
    env.run = FakeRun({})
    r = sandbox_host.check_podman(env)
    assert r.status == "fail"
    assert "podman: not found" in r.detail
