"""The doctor's serving-host checks against a fake host tree (tests/unit/doctor_host.py): the
NVIDIA driver, container toolkit and CDI spec (skipped without a GPU), the gateway and backend
ports, disk space for the planned model, and the state dir; each one's ok and failure path."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from appliance.config import GatewayConfig, ListenConfig
from appliance.ops.doctor import DoctorEnv, serving_host
from tests.helpers import free_port
from tests.unit.doctor_host import GPU_HOST, doctor_env, healthy_root, which_only, write_file


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A healthy host: seccomp, user namespaces, the service user with subids, cgroup v2."""
    return healthy_root(tmp_path)


@pytest.fixture
def env(root: Path, tmp_path: Path) -> DoctorEnv:
    return doctor_env(root, tmp_path)


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
    write_file(root, "/var/run/cdi/nvidia-generated.json", "{}")
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
    env.which = which_only("podman")
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
