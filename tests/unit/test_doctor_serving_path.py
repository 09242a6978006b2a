"""The doctor's `serving path` check: where the backend runs (the host or the appliance image,
as `appliance up` decides) and what stops it from starting there, each with its fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.ops.doctor import DoctorEnv
from appliance.ops.doctor.serving_host import check_serving_path
from hardware.snapshot import HostSnapshot
from tests.conftest import FIXTURES
from tests.unit.doctor_host import CPU_HOST, doctor_env, healthy_root, which_only

# A recorded H100 (its free memory too: the planner picks vLLM there).
GPU_HOST = HostSnapshot.model_validate_json((FIXTURES / "hosts" / "h100_80gb_x1.json").read_text())


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DoctorEnv:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no vllm, no podman to run
    return doctor_env(healthy_root(tmp_path), tmp_path)


def test_embedded_on_the_host_needs_its_packages(
    env: DoctorEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    env.host = CPU_HOST
    monkeypatch.setattr("appliance.bringup.facts.embedded_modules", lambda _: ("json",))
    ok = check_serving_path(env)
    assert (ok.status, ok.detail) == ("ok", "the embedded model on the host")
    monkeypatch.setattr(
        "appliance.bringup.facts.embedded_modules", lambda _: ("json", "no_such_mod_x")
    )
    missing = check_serving_path(env)
    assert missing.status == "fail" and "not installed: no_such_mod_x" in missing.detail
    assert missing.fix == "scripts/setup.sh embedded"


def test_a_gpu_host_without_vllm_takes_the_image_and_needs_podman(env: DoctorEnv) -> None:
    env.host = GPU_HOST
    env.which = which_only()
    result = check_serving_path(env)
    assert result.status == "fail"
    assert "vLLM in the appliance image localhost/appliance-rtx:latest" in result.detail
    assert "podman is not installed" in result.detail and "setup.sh" in (result.fix or "")


def test_an_image_podman_cannot_find_names_the_build(env: DoctorEnv) -> None:
    env.host = GPU_HOST
    env.which = which_only("podman")  # the doctor's view; no podman really runs (PATH is empty)
    result = check_serving_path(env)
    assert result.status == "warn"
    assert result.fix is not None
    assert result.fix.startswith("`appliance image build --target rtx --pull`")


def test_vllm_on_the_host_must_be_on_path(env: DoctorEnv) -> None:
    env.host = GPU_HOST
    env.config.inference.backend = "vllm"
    env.which = which_only()
    missing = check_serving_path(env)
    assert missing.status == "fail" and "no vllm is on PATH" in missing.detail
    assert "container" in (missing.fix or "")
    env.which = which_only("vllm")
    assert check_serving_path(env).detail == "vLLM on the host (/usr/bin/vllm)"
