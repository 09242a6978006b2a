"""The bring-up's probes and printed commands against the real things: the image step's facts
from the service user's real Podman store (the image of this checkout's inputs, computed as
`appliance image build` does), and the dry run's `hf download` line run for real (huggingface_hub's
own CLI) against the Hub stand-in: it fetches what weights.download() fetches, where it puts it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from appliance.bringup.commands import hf_download_argv
from appliance.bringup.facts import Facts
from appliance.bringup.image_facts import probe_image
from appliance.bringup.prepare_steps import image_step
from appliance.config import ApplianceConfig
from appliance.packaging.weights import hub_cache, repo_folder
from tests.integration.test_weights_download import MODEL, NOT_WANTED, WANTED, running_hub

pytestmark = [pytest.mark.integration]

CPU_LATEST = "localhost/appliance-cpu:latest"


def live(image: Any) -> Facts:
    return Facts(live=True, root=True, podman=(4, 3), image=image)


def test_the_cpu_image_of_this_checkout_is_done_and_any_other_is_rebuilt(
    cpu_image: dict[str, Any],
) -> None:
    """`:latest` after ensure_cpu_image is the build of the current inputs: the probe computes
    the same digest from the base's id, so the step is done; an image of other inputs under the
    ref (here the debootstrap base itself) is present but not current: build."""
    config = ApplianceConfig()
    facts = probe_image(config, "cpu", CPU_LATEST)
    assert facts.current == cpu_image["digest"] and facts.current_tag == cpu_image["ref"].tag
    assert facts.present and facts.up_to_date and facts.current_tag_present
    step = image_step("cpu", CPU_LATEST, False, live(facts))
    assert step.state == "done" and step.commands == [], step

    other = probe_image(config, "cpu", "localhost/appliance-base:latest")
    assert other.present and other.current == cpu_image["digest"]
    assert other.up_to_date is False
    rebuilt = image_step("cpu", other.ref, False, live(other))
    assert rebuilt.state == "todo"
    assert rebuilt.commands == [["appliance", "image", "build", "--target", "cpu"]]
    assert "a lookup" in rebuilt.why  # the current build is in the store: it is only re-tagged


def test_a_configured_image_that_is_not_there_is_blocked(cpu_image: dict[str, Any]) -> None:
    ref = "localhost/appliance-no-such-image:1"
    config = ApplianceConfig()
    config.inference.container.image = ref
    facts = probe_image(config, "cpu", ref)
    assert facts.present is False and facts.configured
    step = image_step("cpu", ref, True, live(facts))
    assert step.state == "blocked" and step.commands == [] and step.fix


def test_the_dry_runs_hf_download_fetches_what_download_fetches(tmp_path: Path) -> None:
    """The printed command, run as printed (huggingface_hub's `hf` of this venv): only the files
    vLLM needs, into <models>/hf/hub, as weights.download() (test_weights_download.py)."""
    models = tmp_path / "models"
    argv = hf_download_argv(models, MODEL)
    assert argv[0] == "hf" and not any(a.startswith("HF_HOME=") for a in argv)  # no token there
    hf = str(Path(sys.executable).parent / "hf")
    drop = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("HF_HOME")}
    with running_hub(tmp_path, {MODEL: {}}) as hub:
        env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_UPDATE_CHECK="1")
        done = subprocess.run(
            [hf, *argv[1:]],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        snapshot = hub_cache(models) / repo_folder(MODEL) / "snapshots" / hub.commit()
        got = {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}
        assert got == WANTED
        for name in NOT_WANTED:
            assert hub.served(name) == 0
