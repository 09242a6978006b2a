"""The doctor's `serving path` check: where the backend runs (the host or the appliance image,
as `appliance up` decides) and what stops it from starting there, each with its fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.bringup.facts import Facts
from appliance.bringup.image_facts import ImageFacts
from appliance.bringup.prepare_steps import image_step
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


# The probe itself runs against real Podman in tests/integration/test_bringup_probes.py; here
# its answers are given, to hold the doctor to the bring-up's image step for each of them.
RTX_LATEST = "localhost/appliance-rtx:latest"
CURRENT_INPUTS, OLD_INPUTS = "sha256:" + "c" * 64, "sha256:" + "0" * 64
_BASE = {"base": "vllm/vllm-openai:v0.24.0 (1234)", "current": CURRENT_INPUTS}
_TAG = {"current_tag": "localhost/appliance-rtx:cccccccccccc"}
IMAGE_CASES = {
    "current": (ImageFacts(RTX_LATEST, True, built_from=CURRENT_INPUTS, **_BASE, **_TAG), "ok"),
    "older code": (ImageFacts(RTX_LATEST, True, built_from=OLD_INPUTS, **_BASE, **_TAG), "warn"),
    "absent": (ImageFacts(RTX_LATEST, False, **_BASE, **_TAG), "warn"),
    "offline bundle": (ImageFacts(RTX_LATEST, True, built_from=OLD_INPUTS), "ok"),
    "podman silent": (ImageFacts(RTX_LATEST, None), "warn"),
}


@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_the_doctor_and_up_agree_on_the_image(
    env: DoctorEnv, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """A `:latest` of older code is rebuilt by `appliance up`: the doctor says so too (it used
    to count any `:latest` as fine)."""
    seen, status = IMAGE_CASES[case]
    env.host = GPU_HOST
    env.which = which_only("podman")
    monkeypatch.setattr("appliance.bringup.image_facts.probe_image", lambda *_: seen)
    result = check_serving_path(env)
    step = image_step("rtx", RTX_LATEST, False, Facts(live=True, podman=(5, 4), image=seen))
    assert (result.status, step.state) == (status, {"ok": "done", "warn": "todo"}[status])
    assert result.detail == f"vLLM in the appliance image: {step.why}"
    if status == "warn":
        assert result.fix and result.fix.startswith("`appliance image build --target rtx --pull`")


def test_a_configured_image_that_is_not_there_fails(
    env: DoctorEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    env.host = GPU_HOST
    env.which = which_only("podman")
    env.config.inference.container.image = "registry.example/appliance:1"
    seen = ImageFacts("registry.example/appliance:1", False, configured=True)
    monkeypatch.setattr("appliance.bringup.image_facts.probe_image", lambda *_: seen)
    result = check_serving_path(env)
    assert result.status == "fail" and "is not in the store" in result.detail
    assert result.fix and "podman load" in result.fix
