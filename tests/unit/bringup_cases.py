"""Shared cases of the bring-up step tests: a GPU host's facts with everything in place, and
the steps for a recorded host's snapshot under given facts."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.bringup.facts import Facts
from appliance.bringup.image_facts import ImageFacts
from appliance.bringup.model import GIB, Options, Step
from appliance.bringup.steps import plan_steps
from appliance.config import ApplianceConfig
from hardware.planner import plan_serving
from hardware.snapshot import HostSnapshot
from tests.conftest import FIXTURES

STATE = Path("/var/lib/appliance")
SPARK = "dgx_spark_gb10"
INPUTS = "sha256:" + "c" * 64  # the current inputs' digest
OLD_INPUTS = "sha256:" + "0" * 64
SPARK_LATEST = "localhost/appliance-spark:latest"
# `:latest` is the build of the current inputs, its base in the store.
CURRENT = ImageFacts(
    ref=SPARK_LATEST,
    present=True,
    built_from=INPUTS,
    base="vllm/vllm-openai:v0.24.0 (1234)",
    current=INPUTS,
    current_tag="localhost/appliance-spark:cccccccccccc",
    current_tag_present=True,
)
# A GPU host as `probe()` would see it when everything is in place.
READY = Facts(
    live=True,
    root=True,
    podman=(5, 4),
    systemd=True,
    nvidia_ctk="/usr/bin/nvidia-ctk",
    cdi_spec="/etc/cdi/nvidia.yaml",
    free_bytes=2000 * GIB,
    image=CURRENT,
    weights=True,
    weights_detail="complete in /var/lib/appliance-models/hf/hub",
    embedded_installed=True,
)


@pytest.fixture(autouse=True)
def no_vllm_on_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`auto` on a GPU host takes the container path when no `vllm` is on PATH (the venv's)."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))


def host(name: str) -> HostSnapshot:
    return HostSnapshot.model_validate_json((FIXTURES / "hosts" / f"{name}.json").read_text())


def steps_for(
    name: str, facts: Facts, *, backend: str = "auto", agent: bool = True
) -> dict[str, Step]:
    config = ApplianceConfig(state_dir=STATE)
    config.inference.backend = backend  # type: ignore[assignment]
    snapshot = host(name)
    plan = plan_serving(snapshot, config.inference.vllm)
    options = Options(container=backend == "container", agent=agent)
    bringup = plan_steps(snapshot, config, plan, facts, options)
    return {s.id: s for s in bringup.steps}
