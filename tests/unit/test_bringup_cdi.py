"""The CDI step: a spec that lists nvidia.com/gpu for the host's driver, Podman new enough to
use it, and what the run checks after `nvidia-ctk cdi generate`."""

from __future__ import annotations

import stat
from dataclasses import replace
from pathlib import Path

import pytest

from appliance.bringup.facts import cdi_spec_for
from appliance.bringup.model import Bringup, Step
from appliance.bringup.prepare_steps import PODMAN_CDI_FIX, TOOLKIT_FIX
from appliance.bringup.run import _cdi, refuse_blocked
from appliance.config import load_config
from appliance.errors import PreflightError
from tests.unit.bringup_cases import (
    READY,
    SPARK,
    host,
    no_vllm_on_path,  # noqa: F401  (autouse: applies here)
    steps_for,
)


def test_cdi_spec_absent_is_generated_with_the_toolkit() -> None:
    cdi = steps_for(SPARK, replace(READY, cdi_spec=None))["cdi"]
    assert cdi.state == "todo"
    assert cdi.commands == [["nvidia-ctk", "cdi", "generate", "--output=/etc/cdi/nvidia.yaml"]]


def test_no_toolkit_is_blocked_with_the_fix() -> None:
    cdi = steps_for(SPARK, replace(READY, cdi_spec=None, nvidia_ctk=None))["cdi"]
    assert cdi.state == "blocked"
    assert "nvidia-ctk is not installed" in cdi.why and cdi.fix == TOOLKIT_FIX
    assert "\n" not in cdi.why + cdi.fix


def test_cdi_not_root_is_blocked_with_sudo() -> None:
    cdi = steps_for(SPARK, replace(READY, cdi_spec=None, root=False))["cdi"]
    assert cdi.state == "blocked"
    assert cdi.fix == "sudo nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml"


def _stub_ctk(tmp_path: Path, spec_text: str) -> str:
    """An nvidia-ctk that writes `spec_text` to its --output, as `cdi generate` does."""
    stub = tmp_path / "nvidia-ctk"
    stub.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do case "$a" in --output=*) out="${a#--output=}";; esac; done\n'
        f"printf '%s\\n' '{spec_text}' > \"$out\"\necho generated \"$out\"\n"
    )
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    return str(stub)


@pytest.mark.parametrize(("spec", "ok"), [("kind: nvidia.com/gpu", True), ("kind: x/y", False)])
def test_cdi_generate_then_checks_the_spec(tmp_path: Path, spec: str, ok: bool) -> None:
    out = tmp_path / "cdi" / "nvidia.yaml"
    out.parent.mkdir()
    argv = [_stub_ctk(tmp_path, spec), "cdi", "generate", f"--output={out}"]
    step = Step(id="cdi", title="CDI spec", state="todo", why="", commands=[argv])
    seen: list[str] = []
    config = load_config({"state_dir": str(tmp_path / "state")})
    if ok:
        _cdi(config, step, seen.append)
    else:
        with pytest.raises(PreflightError, match=r"lists no nvidia\.com/gpu"):
            _cdi(config, step, seen.append)
    assert seen == [f"    generated {out}"]


# ---------------------------------------------------------------- Podman new enough for CDI


@pytest.mark.parametrize(("podman", "blocked"), [((3, 4), True), ((4, 0), True), ((4, 1), False)])
def test_podman_without_cdi_devices_is_blocked_on_a_gpu_host(
    podman: tuple[int, int], blocked: bool
) -> None:
    """Ubuntu 22.04's Podman 3.4 cannot resolve --device=nvidia.com/gpu=all (CDI arrived in
    4.1): refused before anything runs, with the one-line fix."""
    steps = steps_for(SPARK, replace(READY, podman=podman))
    cdi = steps["cdi"]
    if not blocked:
        assert cdi.state == "done", cdi
        return
    assert cdi.state == "blocked"
    assert f"Podman {podman[0]}.{podman[1]} cannot give the container the GPU" in cdi.why
    assert cdi.fix == PODMAN_CDI_FIX and "\n" not in cdi.why + cdi.fix
    with pytest.raises(PreflightError, match=r"need Podman >= 4\.1") as caught:
        refuse_blocked(Bringup.model_construct(steps=list(steps.values())))
    assert caught.value.hint == PODMAN_CDI_FIX


def test_podman_version_does_not_matter_without_a_gpu() -> None:
    steps = steps_for("cpu_only", replace(READY, podman=(3, 4)), backend="container")
    assert "cdi" not in steps and not [s for s in steps.values() if s.state == "blocked"]


# ---------------------------------------------------------------- a spec of another driver


def _spec_tree(root: Path, text: str, name: str = "nvidia.yaml", where: str = "etc/cdi") -> None:
    (root / where).mkdir(parents=True)
    (root / where / name).write_text(text)


SPEC_580 = (
    "cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ncontainerEdits:\n  mounts:\n"
    "  - hostPath: /usr/lib/aarch64-linux-gnu/libcuda.so.580.95.05\n"
)


@pytest.mark.parametrize(
    ("driver", "names"), [("580.95.05", True), ("590.44.01", False), (None, None)]
)
def test_the_spec_probe_says_whether_it_names_the_hosts_driver(
    tmp_path: Path, driver: str | None, names: bool | None
) -> None:
    _spec_tree(tmp_path, SPEC_580)
    spec, named = cdi_spec_for(driver, lambda p: tmp_path / p.lstrip("/"))
    assert spec == "/etc/cdi/nvidia.yaml" and named is names


def test_a_spec_without_the_gpu_kind_is_no_spec(tmp_path: Path) -> None:
    _spec_tree(tmp_path, "kind: example.com/x\n", name="nvidia.json", where="var/run/cdi")
    assert cdi_spec_for("580.95.05", lambda p: tmp_path / p.lstrip("/")) == (None, None)


def test_a_spec_of_another_driver_is_generated_again_in_its_place() -> None:
    """After a driver upgrade the spec names the old libcuda.so.<ver>: counting it as done
    makes container create fail later; it is regenerated where it is (a second spec beside it
    would define the same devices twice)."""
    stale = replace(READY, cdi_spec="/var/run/cdi/nvidia.yaml", cdi_names_driver=False)
    cdi = steps_for(SPARK, stale)["cdi"]
    assert cdi.state == "todo"
    assert cdi.commands == [["nvidia-ctk", "cdi", "generate", "--output=/var/run/cdi/nvidia.yaml"]]
    driver = host(SPARK).driver_version
    assert driver and f"another driver than this host's {driver}" in cdi.why
    not_root = steps_for(SPARK, replace(stale, root=False))["cdi"]
    assert not_root.state == "blocked"
    assert not_root.fix == "sudo nvidia-ctk cdi generate --output=/var/run/cdi/nvidia.yaml"
    no_toolkit = steps_for(SPARK, replace(stale, nvidia_ctk=None))["cdi"]
    assert no_toolkit.state == "blocked" and no_toolkit.fix == TOOLKIT_FIX


def test_a_spec_of_this_driver_or_an_unknown_one_is_done() -> None:
    current = steps_for(SPARK, replace(READY, cdi_names_driver=True))["cdi"]
    assert current.state == "done" and "for driver" in current.why
    unknown = steps_for(SPARK, replace(READY, cdi_names_driver=None))["cdi"]
    assert unknown.state == "done"
