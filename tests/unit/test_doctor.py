"""Each doctor check against a fake host tree: its ok path and its failure path, with a fix."""

from __future__ import annotations

import errno
import json
import shutil
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from appliance.config import ApplianceConfig, GatewayConfig, ListenConfig
from appliance.ops.doctor import (
    CHECKS,
    CheckResult,
    DoctorEnv,
    all_ok,
    run_checks,
    sandbox_host,
    serving_host,
)
from appliance.ops.doctor.env import run_argv
from hardware.snapshot import GpuInfo, HostClass, HostSnapshot
from tests.conftest import FIXTURES
from tests.helpers import free_port

CPU_HOST = HostSnapshot(
    host_class=HostClass.CPU_ONLY,
    cpu_count=4,
    memory_total_mib=16384,
    memory_available_mib=8192,
    nvml_error="NVML library not found",
)
GPU_HOST = HostSnapshot(
    host_class=HostClass.DATACENTER,
    cpu_count=32,
    memory_total_mib=262144,
    memory_available_mib=200000,
    driver_version="580.95.05",
    cuda_driver_version="13.0",
    gpus=[GpuInfo(index=0, name="NVIDIA H100 80GB HBM3", memory_total_mib=81559)],
)


def _write(root: Path, path: str, text: str) -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A healthy host: seccomp, user namespaces, the service user with subids, cgroup v2."""
    r = tmp_path / "root"
    _write(r, "/proc/self/status", "Name:\tpython\nSeccomp:\t0\nSeccomp_filters:\t0\n")
    _write(
        r,
        "/proc/sys/kernel/seccomp/actions_avail",
        "kill_process kill_thread trap errno user_notif trace log allow\n",
    )
    _write(r, "/proc/sys/user/max_user_namespaces", "96365\n")
    _write(r, "/etc/passwd", "root:x:0:0:root:/root:/bin/bash\nappliance:x:999:999::/home/a:\n")
    _write(r, "/etc/subuid", "appliance:100000:65536\n")
    _write(r, "/etc/subgid", "999:100000:65536\n")  # numeric uid entries are valid too
    _write(r, "/sys/fs/cgroup/cgroup.controllers", "cpu memory pids\n")
    return r


class FakeRun:
    """Stands in for subprocess.run: answers `<tool> --version` from a table."""

    def __init__(self, outputs: dict[str, str]) -> None:
        self.outputs = outputs
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(argv))
        tool = Path(argv[0]).name
        if tool not in self.outputs:
            return subprocess.CompletedProcess(argv, 127, "", f"{tool}: not found")
        return subprocess.CompletedProcess(argv, 0, self.outputs[tool], "")


def _which(*present: str):
    def which(name: str) -> str | None:
        return f"/usr/bin/{name}" if name in present else None

    return which


ALL_TOOLS = ("podman", "runc", "newuidmap", "newgidmap", "nvidia-ctk")
VERSIONS = {"podman": "podman version 4.9.3\n", "runc": "runc version 1.1.12\ncommit: v1\n"}


@pytest.fixture
def env(root: Path, tmp_path: Path) -> DoctorEnv:
    config = ApplianceConfig(
        state_dir=tmp_path / "state",
        gateway=GatewayConfig(port=free_port()),
    )
    config.inference.backend_listen = ListenConfig(port=free_port())
    return DoctorEnv(
        config=config,
        host=CPU_HOST,
        root=root,
        which=_which(*ALL_TOOLS),
        run=FakeRun(VERSIONS),
        landlock_abi=lambda: 7,
        required_gib=0.001,
    )


def _raise(code: int):
    def probe() -> int:
        raise OSError(code, "probe")

    return probe


def test_every_check_passes_on_a_healthy_host(env: DoctorEnv) -> None:
    results = run_checks(env)
    assert [r.name for r in results] == [name for name, _ in CHECKS]
    assert {r.name: r.status for r in results if r.status != "ok"} == {
        "nvidia driver": "skip",
        "container toolkit": "skip",
        "cdi spec": "skip",
    }
    assert all_ok(results)


def test_each_check_reports_its_registered_name(env: DoctorEnv) -> None:
    for name, check in CHECKS:
        assert check(env).name == name


def test_non_ok_results_carry_a_fix(env: DoctorEnv, root: Path) -> None:
    (root / "proc").rename(root / "gone")
    (root / "etc").rename(root / "gone-etc")
    env.which = _which()
    env.landlock_abi = _raise(errno.ENOSYS)
    env.host = GPU_HOST
    for r in run_checks(env):
        if r.status == "fail":
            assert r.fix, r


# ---------------------------------------------------------------- landlock


def test_landlock_ok(env: DoctorEnv) -> None:
    r = sandbox_host.check_landlock(env)
    assert (r.status, r.detail) == ("ok", "ABI 7")


def test_landlock_enosys_fails_with_kernel_fix(env: DoctorEnv) -> None:
    env.landlock_abi = _raise(errno.ENOSYS)
    r = sandbox_host.check_landlock(env)
    assert r.status == "fail"
    assert "CONFIG_SECURITY_LANDLOCK=y" in (r.fix or "")
    assert "lsm=landlock" in (r.fix or "")


def test_landlock_disabled_at_boot_fails(env: DoctorEnv) -> None:
    env.landlock_abi = _raise(errno.EOPNOTSUPP)
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
    _write(root, "/proc/self/status", "Name:\tpython\n")
    r = sandbox_host.check_seccomp(env)
    assert r.status == "fail"
    assert "CONFIG_SECCOMP" in (r.fix or "")


def test_seccomp_without_errno_action_fails(env: DoctorEnv, root: Path) -> None:
    _write(root, "/proc/sys/kernel/seccomp/actions_avail", "kill_thread trap allow\n")
    r = sandbox_host.check_seccomp(env)
    assert r.status == "fail"
    assert "errno, kill_process" in r.detail


def test_userns_ok(env: DoctorEnv) -> None:
    assert sandbox_host.check_userns(env).status == "ok"


def test_userns_zero_fails_naming_the_sysctl(env: DoctorEnv, root: Path) -> None:
    _write(root, "/proc/sys/user/max_user_namespaces", "0\n")
    r = sandbox_host.check_userns(env)
    assert r.status == "fail"
    assert "user.max_user_namespaces" in (r.fix or "")


def test_userns_debian_switch_off_fails(env: DoctorEnv, root: Path) -> None:
    _write(root, "/proc/sys/kernel/unprivileged_userns_clone", "0\n")
    r = sandbox_host.check_userns(env)
    assert r.status == "fail"
    assert "kernel.unprivileged_userns_clone=1" in (r.fix or "")
    _write(root, "/proc/sys/kernel/unprivileged_userns_clone", "1\n")
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
    _write(root, "/etc/subuid", "appliance:100000:1000\n")
    r = sandbox_host.check_service_user(env)
    assert r.status == "fail"
    assert "1000 subuids" in r.detail
    assert r.fix == ("usermod --add-subuids 100000-165535 --add-subgids 100000-165535 appliance")


def test_service_user_ranges_add_up(env: DoctorEnv, root: Path) -> None:
    _write(root, "/etc/subuid", "appliance:100000:32768\nother:1:65536\nappliance:200000:32768\n")
    assert sandbox_host.check_service_user(env).status == "ok"


# ---------------------------------------------------------------- podman, runtime


def test_podman_ok_reports_version(env: DoctorEnv) -> None:
    r = sandbox_host.check_podman(env)
    assert (r.status, r.detail) == ("ok", "podman 4.9.3")
    assert env.run.calls == [["/usr/bin/podman", "--version"]]  # type: ignore[attr-defined]


def test_podman_missing_fails_with_apt_fix(env: DoctorEnv) -> None:
    env.which = _which("runc")
    r = sandbox_host.check_podman(env)
    assert r.status == "fail"
    assert r.fix == "apt-get install podman runc uidmap slirp4netns"


def test_podman_3_fails(env: DoctorEnv) -> None:
    env.run = FakeRun({"podman": "podman version 3.4.4\n"})
    r = sandbox_host.check_podman(env)
    assert r.status == "fail"
    assert ">= 4" in r.detail


def test_podman_without_newuidmap_fails(env: DoctorEnv) -> None:
    env.which = _which("podman")
    r = sandbox_host.check_podman(env)
    assert r.status == "fail"
    assert r.fix == "apt-get install uidmap"


def test_runc_ok(env: DoctorEnv) -> None:
    r = sandbox_host.check_oci_runtime(env)
    assert (r.status, r.detail) == ("ok", "runc version 1.1.12")


def test_crun_only_on_hybrid_cgroups_fails(env: DoctorEnv, root: Path) -> None:
    (root / "sys/fs/cgroup/cgroup.controllers").unlink()
    _write(root, "/sys/fs/cgroup/unified/cgroup.controllers", "")  # the hybrid layout
    env.which = _which("crun")
    r = sandbox_host.check_oci_runtime(env)
    assert r.status == "fail"
    assert "--runtime runc" in (r.fix or "")


def test_crun_only_on_cgroup_v2_ok(env: DoctorEnv) -> None:
    env.which = _which("crun")
    assert sandbox_host.check_oci_runtime(env).status == "ok"


def test_no_runtime_fails(env: DoctorEnv) -> None:
    env.which = _which()
    r = sandbox_host.check_oci_runtime(env)
    assert r.status == "fail"
    assert r.fix == "apt-get install runc"


# ---------------------------------------------------------------- GPU


@pytest.mark.parametrize(
    "check",
    [
        serving_host.check_nvidia_driver,
        serving_host.check_container_toolkit,
        serving_host.check_cdi_spec,
    ],
)
def test_gpu_checks_skip_on_cpu_only_host(env: DoctorEnv, check) -> None:
    r = check(env)
    assert r.status == "skip"
    assert r.detail == "no NVIDIA GPU: NVML library not found"


def test_gpu_host_ok_with_driver_toolkit_and_cdi(env: DoctorEnv, root: Path) -> None:
    env.host = GPU_HOST
    _write(root, "/var/run/cdi/nvidia-generated.json", "{}")
    driver = serving_host.check_nvidia_driver(env)
    assert driver.status == "ok"
    assert "580.95.05" in driver.detail
    assert serving_host.check_container_toolkit(env).status == "ok"
    cdi = serving_host.check_cdi_spec(env)
    assert (cdi.status, cdi.detail) == ("ok", "/var/run/cdi/nvidia-generated.json")


def test_gpu_host_without_cdi_spec_fails(env: DoctorEnv) -> None:
    env.host = GPU_HOST
    r = serving_host.check_cdi_spec(env)
    assert r.status == "fail"
    assert r.fix == "nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml"


def test_gpu_host_without_toolkit_warns(env: DoctorEnv) -> None:
    env.host = GPU_HOST
    env.which = _which("podman")
    r = serving_host.check_container_toolkit(env)
    assert r.status == "warn"
    assert "nvidia-container-toolkit" in (r.fix or "")


# ---------------------------------------------------------------- ports


def test_free_ports_ok(env: DoctorEnv) -> None:
    assert serving_host.check_gateway_port(env).status == "ok"
    assert serving_host.check_backend_port(env).status == "ok"


def test_port_held_by_a_bound_socket_is_in_use(env: DoctorEnv) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        env.config.gateway = GatewayConfig(port=held.getsockname()[1])
        r = serving_host.check_gateway_port(env)
    assert r.status == "warn"
    assert "in use (by a running appliance?)" in r.detail
    assert (r.fix or "").startswith("fine if the appliance is already up")


def test_non_loopback_gateway_warns(env: DoctorEnv) -> None:
    env.config.gateway = GatewayConfig(host="0.0.0.0", port=free_port())
    r = serving_host.check_gateway_port(env)
    assert r.status == "warn"
    assert "not loopback" in r.detail
    assert "gateway.host" in (r.fix or "")


def test_unbindable_address_fails(env: DoctorEnv) -> None:
    env.config.inference.backend_listen = ListenConfig(host="192.0.2.1", port=free_port())
    r = serving_host.check_backend_port(env)
    assert r.status == "fail"
    assert "cannot bind 192.0.2.1" in r.detail


# ---------------------------------------------------------------- disk, state


def test_disk_space_ok_for_small_model(env: DoctorEnv) -> None:
    env.required_for = "nano-fp8"
    r = serving_host.check_disk(env)
    assert r.status == "ok"
    assert "nano-fp8 needs 0.0 GiB" in r.detail


def test_disk_space_fails_for_huge_model(env: DoctorEnv) -> None:
    env.required_gib = 1e9
    r = serving_host.check_disk(env)
    assert r.status == "fail"
    assert "models_dir" in (r.fix or "")


def test_disk_space_warns_under_twice_the_need(env: DoctorEnv, tmp_path: Path) -> None:
    free_gib = shutil.disk_usage(tmp_path).free / 1024**3
    env.required_gib = free_gib * 0.75
    r = serving_host.check_disk(env)
    assert r.status == "warn"


def test_disk_space_unknown_model_uses_floor(env: DoctorEnv) -> None:
    env.required_gib = None
    r = serving_host.check_disk(env)
    assert "floor 10.0 GiB" in r.detail


def test_state_dir_creatable(env: DoctorEnv, tmp_path: Path) -> None:
    r = serving_host.check_state_dir(env)
    assert (r.status, r.detail) == ("ok", f"{tmp_path / 'state'} creatable in {tmp_path}")


def test_state_dir_under_a_file_fails(env: DoctorEnv, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    env.config.state_dir = tmp_path / "file" / "state"
    r = serving_host.check_state_dir(env)
    assert r.status == "fail"
    assert "not a directory" in r.detail
    assert r.fix


# ---------------------------------------------------------------- run_checks


def test_crashing_check_becomes_a_failed_result(env: DoctorEnv) -> None:
    def broken(_: DoctorEnv) -> CheckResult:
        raise RuntimeError("boom")

    results = run_checks(env, [("broken", broken), ("landlock", sandbox_host.check_landlock)])
    assert results[0].status == "fail"
    assert results[0].name == "broken"
    assert results[0].detail == "check crashed: RuntimeError: boom"
    assert results[1].status == "ok"
    assert not all_ok(results)


# ---------------------------------------------------------------- the command


def _cli(monkeypatch, results: list[CheckResult], host: HostSnapshot):
    """An app with just `doctor`, telemetry returning `host`, and the checks' results fixed."""
    import typer

    from appliance.cli import doctor as cli

    seen: list[DoctorEnv] = []

    def fake_run_checks(env: DoctorEnv) -> list[CheckResult]:
        seen.append(env)
        return results

    monkeypatch.setattr("hardware.telemetry.collect", lambda: host)
    monkeypatch.setattr(cli, "run_checks", fake_run_checks)
    app = typer.Typer()
    app.command("doctor")(cli.doctor)
    app.command("other")(lambda: None)  # two commands, so `doctor` is a subcommand
    return app, seen


OK = CheckResult(name="landlock", status="ok", detail="ABI 7")
WARN = CheckResult(name="gateway port", status="warn", detail="in use", fix="fine if up")
FAIL = CheckResult(name="podman", status="fail", detail="podman not found", fix="apt-get x")


def test_cli_json_and_exit_code_on_failure(monkeypatch) -> None:
    from typer.testing import CliRunner

    from hardware.planner import plan_serving

    host = HostSnapshot.model_validate_json((FIXTURES / "hosts" / "h100_80gb_x2.json").read_text())
    plan = plan_serving(host)
    assert plan.memory is not None and plan.tensor_parallel_size == 2
    app, seen = _cli(monkeypatch, [OK, WARN, FAIL], host)
    result = CliRunner().invoke(app, ["doctor", "--json"])
    assert result.exit_code == 6, result.output
    data = json.loads(result.stdout)
    assert data["ok"] is False
    assert [c["status"] for c in data["checks"]] == ["ok", "warn", "fail"]
    # The disk must hold every shard: per-GPU weights times the tensor-parallel size.
    assert seen[0].required_gib == pytest.approx(plan.memory.weights_gib * 2)
    assert seen[0].required_for == plan.variant


def test_cli_human_output_warnings_exit_zero(monkeypatch) -> None:
    from typer.testing import CliRunner

    app, seen = _cli(monkeypatch, [OK, WARN], CPU_HOST)
    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    assert "✓ ok" in result.stdout
    assert "! warn" in result.stdout
    assert "fix gateway port: fine if up" in result.stdout
    assert "0 failed, 1 warning" in result.stdout
    assert seen[0].required_gib is None  # embedded plan has no GPU budget: the disk floor applies


def test_default_run_turns_a_missing_binary_into_a_result(tmp_path: Path) -> None:
    proc = run_argv([str(tmp_path / "no-such-tool"), "--version"])
    assert proc.returncode == 126


def test_podman_version_failure_fails(env: DoctorEnv) -> None:
    env.run = FakeRun({})
    r = sandbox_host.check_podman(env)
    assert r.status == "fail"
    assert "podman: not found" in r.detail
