"""A fake host for the doctor's checks: host snapshots, a healthy root tree, tools on PATH.

The test modules (tests/unit/test_doctor*.py) each turn `healthy_root` and `doctor_env` into their
`root` and `env` fixtures; checks read the tree under `root` instead of `/`."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from appliance.config import ApplianceConfig, GatewayConfig, ListenConfig
from appliance.ops.doctor import DoctorEnv
from hardware.snapshot import GpuInfo, HostClass, HostSnapshot
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


def write_file(root: Path, path: str, text: str) -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


def healthy_root(tmp_path: Path) -> Path:
    """A healthy host: seccomp, user namespaces, the service user with subids, cgroup v2."""
    r = tmp_path / "root"
    write_file(r, "/proc/self/status", "Name:\tpython\nSeccomp:\t0\nSeccomp_filters:\t0\n")
    write_file(
        r,
        "/proc/sys/kernel/seccomp/actions_avail",
        "kill_process kill_thread trap errno user_notif trace log allow\n",
    )
    write_file(r, "/proc/sys/user/max_user_namespaces", "96365\n")
    write_file(r, "/etc/passwd", "root:x:0:0:root:/root:/bin/bash\nappliance:x:999:999::/home/a:\n")
    write_file(r, "/etc/subuid", "appliance:100000:65536\n")
    write_file(r, "/etc/subgid", "999:100000:65536\n")  # numeric uid entries are valid too
    write_file(r, "/sys/fs/cgroup/cgroup.controllers", "cpu memory pids\n")
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


def which_only(*present: str) -> Callable[[str], str | None]:
    def which(name: str) -> str | None:
        return f"/usr/bin/{name}" if name in present else None

    return which


ALL_TOOLS = ("podman", "runc", "newuidmap", "newgidmap", "nvidia-ctk")
VERSIONS = {"podman": "podman version 4.9.3\n", "runc": "runc version 1.1.12\ncommit: v1\n"}


def doctor_env(root: Path, tmp_path: Path) -> DoctorEnv:
    """Every tool present and answering `--version`, Landlock ABI 7, free loopback ports."""
    config = ApplianceConfig(
        state_dir=tmp_path / "state",
        gateway=GatewayConfig(port=free_port()),
    )
    config.inference.backend_listen = ListenConfig(port=free_port())
    return DoctorEnv(
        config=config,
        host=CPU_HOST,
        root=root,
        which=which_only(*ALL_TOOLS),
        run=FakeRun(VERSIONS),
        landlock_abi=lambda: 7,
        required_gib=0.001,
    )


def failing_probe(code: int) -> Callable[[], int]:
    def probe() -> int:
        raise OSError(code, "probe")

    return probe
