"""`appliance up`'s weights step when the weights are already there: put by a bundle, by `hf
download` or under umask 077 they may be private to root, and the image's user (uid 10001 in the
service user's subuid range) could not read them. The step finds them (no network) and opens
their modes up before the supervisor starts."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from appliance.bringup.model import Bringup, Step
from appliance.bringup.run import run_prepare
from appliance.config import ApplianceConfig
from hardware.plan_types import ServingPlan
from tests.unit.test_weights import MODEL, make_snapshot


def test_present_weights_are_opened_up_for_the_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = ApplianceConfig(state_dir=tmp_path / "state", models_dir=tmp_path / "models")
    snapshot = make_snapshot(config.resolved_models_dir)
    for root, _dirs, files in os.walk(config.resolved_models_dir):
        os.chmod(root, 0o700)
        for name in files:
            os.chmod(os.path.join(root, name), 0o600)
    plan = ServingPlan(backend="vllm", variant="x", model=MODEL, served_model_name="m",
                       max_model_len=4096, max_num_seqs=1)  # fmt: skip
    step = Step(id="weights", title="model weights", state="done", why="present")
    bringup = Bringup(host="rtx", recorded=False, path="container", backend="vllm", variant="x",
                      model=MODEL, target="rtx", image="i", embedded_on_host=False,
                      environment="", steps=[step])  # fmt: skip
    said: list[str] = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # present: no network either way
    run_prepare(config, plan, bringup, said.append)
    assert said and "[done]" in said[0]
    for path in [snapshot, *snapshot.iterdir()]:
        mode = stat.S_IMODE(path.resolve().stat().st_mode)
        assert mode == (0o755 if path.resolve().is_dir() else 0o644), (path, oct(mode))
    assert stat.S_IMODE(config.resolved_models_dir.stat().st_mode) == 0o755
