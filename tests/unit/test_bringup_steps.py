"""The bring-up steps on live-like facts (what each state means and the fix it names), the runner's
refusals and relays, and `appliance up`'s hostile input: bad snapshot files, flag combinations
that would run something on a recorded host."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from appliance.bringup.facts import Facts, recorded
from appliance.bringup.image_facts import ImageFacts
from appliance.bringup.model import GIB, Options, Step
from appliance.bringup.prepare_steps import TOOLKIT_FIX
from appliance.bringup.run import refuse_blocked, run_command
from appliance.bringup.steps import plan_steps
from appliance.cli.main import main
from appliance.config import ApplianceConfig, load_config
from appliance.errors import ApplianceError, PreflightError, exit_code_for
from appliance.packaging.weights import ALLOW_PATTERNS
from hardware.planner import plan_serving
from tests.conftest import FIXTURES
from tests.unit.bringup_cases import (
    CURRENT,
    INPUTS,
    OLD_INPUTS,
    READY,
    SPARK,
    SPARK_LATEST,
    STATE,
    host,
    no_vllm_on_path,  # noqa: F401  (autouse: applies here by being imported)
    steps_for,
)

# ---------------------------------------------------------------- states on a live host


def test_everything_in_place_is_done_and_only_serve_is_left() -> None:
    steps = steps_for(SPARK, READY)
    assert list(steps) == ["setup", "image", "cdi", "weights", "serve", "agent", "status"]
    for done in ("setup", "image", "cdi", "weights"):
        assert steps[done].state == "done", steps[done]
    assert steps["image"].commands == [] and steps["weights"].commands == []
    assert steps["serve"].state == "todo"


def test_image_absent_is_built_and_podman_absent_is_blocked() -> None:
    absent = replace(CURRENT, present=False, built_from=None, current_tag_present=False)
    image = steps_for(SPARK, replace(READY, image=absent))["image"]
    assert image.state == "todo"
    assert image.commands == [["appliance", "image", "build", "--target", "spark", "--pull"]]
    assert "appliance image load" in image.why  # the offline way
    cpu_absent = ImageFacts(ref="localhost/appliance-cpu:latest", present=False)
    cpu = steps_for("cpu_only", replace(READY, image=cpu_absent), backend="container")["image"]
    assert cpu.commands == [["appliance", "image", "build", "--target", "cpu"]]  # built here
    blocked = steps_for(SPARK, replace(READY, podman=None, image=None))["image"]
    assert blocked.state == "blocked" and blocked.fix and "setup.sh" in blocked.fix


def test_latest_of_older_code_is_rebuilt_not_served() -> None:
    """After a code change `:latest` is the old code's image: the step builds the current one
    (a lookup when that build is in the store already) instead of calling it done."""
    old = replace(CURRENT, built_from=OLD_INPUTS, current_tag_present=False)
    image = steps_for(SPARK, replace(READY, image=old))["image"]
    assert image.state == "todo"
    assert image.commands == [["appliance", "image", "build", "--target", "spark", "--pull"]]
    assert "built from other inputs (000000000000)" in image.why
    assert "localhost/appliance-spark:cccccccccccc" in image.why
    retag = steps_for(SPARK, replace(READY, image=replace(old, current_tag_present=True)))
    assert retag["image"].state == "todo" and "a lookup" in retag["image"].why
    cpu = ImageFacts(
        ref="localhost/appliance-cpu:latest",
        present=True,
        built_from=OLD_INPUTS,
        base="64ce69dea940",
        current=INPUTS,
        current_tag="localhost/appliance-cpu:cccccccccccc",
        current_tag_present=False,
    )
    cpu_step = steps_for("cpu_only", replace(READY, image=cpu), backend="container")["image"]
    assert cpu_step.state == "todo"
    assert cpu_step.commands == [["appliance", "image", "build", "--target", "cpu"]]
    current = replace(cpu, built_from=INPUTS, current_tag_present=True)
    cpu_done = steps_for("cpu_only", replace(READY, image=current), backend="container")["image"]
    assert cpu_done.state == "done" and cpu_done.commands == []


def test_a_gpu_image_without_its_vllm_base_is_used_as_it_is() -> None:
    """An offline host that loaded a bundle has `:latest` but not the vLLM image: it is not
    asked to pull; the step says which inputs the image was built from and how to rebuild."""
    loaded = ImageFacts(ref=SPARK_LATEST, present=True, built_from=OLD_INPUTS)
    image = steps_for(SPARK, replace(READY, image=loaded))["image"]
    assert image.state == "done" and image.commands == []
    assert "built from inputs 000000000000" in image.why
    assert "`appliance image build --target spark --pull`" in image.why
    # The cpu base is built here: without it, the image of the current inputs is built.
    cpu = ImageFacts(ref="localhost/appliance-cpu:latest", present=True, built_from=OLD_INPUTS)
    cpu_step = steps_for("cpu_only", replace(READY, image=cpu), backend="container")["image"]
    assert cpu_step.state == "todo" and cpu_step.commands


def configured_steps(facts: Facts, image: str = "registry.example/acme/appliance:1") -> Step:
    config = ApplianceConfig(state_dir=STATE)
    config.inference.container.image = image
    snapshot = host(SPARK)
    plan = plan_serving(snapshot, config.inference.vllm)
    bringup = plan_steps(snapshot, config, plan, facts, Options())
    step = bringup.step("image")
    assert step is not None and bringup.image == image
    return step


def test_a_configured_image_must_be_there() -> None:
    ref = "registry.example/acme/appliance:1"
    missing = configured_steps(replace(READY, image=ImageFacts(ref, False, configured=True)))
    assert missing.state == "blocked" and missing.commands == []  # never built or pulled here
    assert missing.why == f"inference.container.image {ref} is not in the store"
    assert missing.fix and "podman load" in missing.fix and "\n" not in missing.fix
    there = configured_steps(replace(READY, image=ImageFacts(ref, True, configured=True)))
    assert there.state == "done" and there.commands == []
    unknown = configured_steps(recorded())
    assert unknown.state == "todo" and "not probed" in unknown.why and unknown.commands == []
    with pytest.raises(PreflightError, match="is not in the store"):
        config = ApplianceConfig(state_dir=STATE)
        config.inference.container.image = ref
        snapshot = host(SPARK)
        plan = plan_serving(snapshot, config.inference.vllm)
        facts = replace(READY, image=ImageFacts(ref, False, configured=True))
        refuse_blocked(plan_steps(snapshot, config, plan, facts, Options()))


def test_weights_absent_are_downloaded_and_a_short_disk_is_blocked() -> None:
    todo = steps_for(SPARK, replace(READY, weights=False))["weights"]
    assert todo.state == "todo"
    include = [a for p in ALLOW_PATTERNS for a in ("--include", p)]
    assert todo.commands == [
        [
            "hf",
            "download",
            "nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-NVFP4",
            *include,
            "--cache-dir",
            "/var/lib/appliance-models/hf/hub",
        ]
    ]
    short = steps_for(SPARK, replace(READY, weights=False, free_bytes=10 * GIB))["weights"]
    assert short.state == "blocked"
    assert "only 10.0 GiB free" in short.why and "models_dir" in (short.fix or "")


def test_a_resumed_download_needs_room_only_for_the_rest() -> None:
    """Super NVFP4 is ~70 GiB: with 60 GiB of it fetched, 30 GiB free is room enough."""
    resumed = replace(READY, weights=False, free_bytes=30 * GIB, weights_on_disk=60 * GIB)
    step = steps_for(SPARK, resumed)["weights"]
    assert step.state == "todo" and "60.0 GiB of it fetched already" in step.why
    short = steps_for(SPARK, replace(resumed, weights_on_disk=10 * GIB))["weights"]
    assert short.state == "blocked" and "only 30.0 GiB free" in short.why


def test_the_run_checks_the_disk_for_the_rest_of_a_resumed_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run.py's own check before download(): the blobs on disk (a sparse file here: it takes no
    space) count, so a download that resumes is not refused for the whole model's size."""
    import shutil

    from appliance.bringup.run import _weights
    from appliance.packaging import weights

    models = tmp_path / "models"
    free = shutil.disk_usage(tmp_path).free
    need = free + 8 * GIB  # more than this disk has
    plan = plan_serving(host(SPARK), ApplianceConfig().inference.vllm)
    blobs = weights.hub_cache(models) / weights.repo_folder(plan.model) / "blobs"
    blobs.mkdir(parents=True)
    with (blobs / "part").open("wb") as blob:
        blob.truncate(need - GIB)  # all but 1 GiB fetched
    fetched: list[str] = []
    monkeypatch.setattr(weights, "required_bytes", lambda _plan: need)
    monkeypatch.setattr(weights, "download", lambda m, d, progress: fetched.append(m) or d)
    config = load_config({"state_dir": str(tmp_path / "state"), "models_dir": str(models)})
    step = Step(id="weights", title="model weights", state="todo", why="")
    seen: list[str] = []
    _weights(config, plan, step, seen.append)
    assert fetched == [plan.model] and seen[0] == f"    disk: room for 1.0 GiB at {models}"
    (blobs / "part").unlink()  # nothing fetched yet: the whole model does not fit
    with pytest.raises(PreflightError, match="not enough disk space"):
        _weights(config, plan, step, seen.append)


def test_host_vllm_needs_no_image_or_cdi_but_weights() -> None:
    steps = steps_for("rtx_4090_24gb", READY, backend="vllm")
    assert list(steps) == ["setup", "weights", "serve", "agent", "status"]
    assert "podman" not in steps["serve"].commands[-1]
    assert "vllm" in steps["serve"].commands[-1]


def test_embedded_on_host_without_its_packages_is_blocked() -> None:
    setup = steps_for("cpu_only", replace(READY, embedded_installed=False))["setup"]
    assert setup.state == "blocked" and "setup.sh embedded" in (setup.fix or "")
    # In the image the host needs none of them.
    image_path = steps_for(
        "cpu_only", replace(READY, embedded_installed=False), backend="container"
    )
    assert image_path["setup"].state == "done"


def test_agent_is_root_only_and_skippable() -> None:
    assert steps_for(SPARK, replace(READY, root=False))["agent"].state == "skip"
    skipped = steps_for(SPARK, READY, agent=False)["agent"]
    assert skipped.state == "skip" and skipped.why == "APPLIANCE_NO_AGENT=1"
    assert steps_for(SPARK, READY)["agent"].state == "todo"


def test_already_up_is_done() -> None:
    serve = steps_for("cpu_only", replace(READY, supervisor_pid=4242))["serve"]
    assert serve.state == "done" and "4242" in serve.why


def test_container_flag_reaches_the_supervisor_through_its_env() -> None:
    serve = steps_for("cpu_only", READY, backend="container")["serve"]
    assert serve.commands[0] == [
        "env",
        "APPLIANCE_INFERENCE__BACKEND=container",
        "appliance",  # the entry point the user types, not this interpreter's path
        "--state-dir",
        str(STATE),
        "serve",
        "all",
        "--instance",
        "<instance>",
    ]
    # and that variable is what the supervisor's config reads
    assert load_config({}, {"APPLIANCE_INFERENCE__BACKEND": "container"}).inference.backend == (
        "container"
    )


def test_the_venvs_python_is_shown_relative_to_the_checkout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The embedded server on the host runs as the venv's python: shown as typed from the
    checkout, not as this machine's absolute path."""
    checkout = Path(__file__).resolve().parents[2]
    monkeypatch.setattr(sys, "executable", str(checkout / ".venv" / "bin" / "python"))
    serve = steps_for("cpu_only", READY)["serve"]
    assert serve.commands[-1][:3] == ["env", "HF_HUB_OFFLINE=1", ".venv/bin/python"]
    assert not any(str(checkout) in arg for argv in serve.commands for arg in argv)
    monkeypatch.setattr(sys, "executable", "/opt/py/bin/python3")  # a venv elsewhere: as it is
    assert steps_for("cpu_only", READY)["serve"].commands[-1][2] == "/opt/py/bin/python3"


def test_quadlet_alternative_only_where_it_can_run() -> None:
    config = ApplianceConfig(state_dir=STATE)
    snapshot = host(SPARK)
    plan = plan_serving(snapshot, config.inference.vllm)
    quadlet = plan_steps(snapshot, config, plan, READY, Options())
    assert "appliance units render --container localhost/appliance-spark:latest" in (
        quadlet.environment
    )
    old = plan_steps(snapshot, config, plan, replace(READY, podman=(4, 3)), Options())
    assert old.environment.startswith("Podman 4.3, systemd: no Quadlet units")


def test_recorded_host_probes_nothing_and_blocks_nothing() -> None:
    steps = steps_for(SPARK, recorded())
    assert all(s.state == "todo" for s in steps.values())
    assert all("not probed" in steps[s].why for s in ("image", "cdi", "weights"))


# ---------------------------------------------------------------- the runner


def test_a_blocked_step_is_one_line_and_its_fix() -> None:
    config = ApplianceConfig(state_dir=STATE)
    snapshot = host(SPARK)
    plan = plan_serving(snapshot, config.inference.vllm)
    facts = replace(READY, cdi_spec=None, nvidia_ctk=None)
    bringup = plan_steps(snapshot, config, plan, facts, Options())
    with pytest.raises(PreflightError) as caught:
        refuse_blocked(bringup)
    assert str(caught.value).startswith("CDI spec (nvidia.com/gpu): no CDI spec lists")
    assert caught.value.hint == TOOLKIT_FIX
    assert exit_code_for(caught.value) == 6


def test_a_failing_appliance_command_relays_its_own_error(tmp_path: Path) -> None:
    """The child's `appliance: error:` and hint become ours (one line, not its whole output)."""
    bad = tmp_path / "host.json"
    bad.write_text("not json")
    config = load_config({"state_dir": str(tmp_path / "state")})
    seen: list[str] = []
    argv = ["appliance", "plan", "--host-snapshot", str(bad)]
    with pytest.raises(ApplianceError) as caught:
        run_command(config, argv, seen.append, title="plan")
    assert str(caught.value) == f"plan: {bad}: Invalid JSON: expected ident at line 1 column 2"
    assert caught.value.hint and "HostSnapshot" in caught.value.hint
    assert any("appliance: error:" in line for line in seen)  # shown as it came


def test_a_missing_command_is_one_line(tmp_path: Path) -> None:
    config = load_config({"state_dir": str(tmp_path / "state")})
    with pytest.raises(PreflightError, match="cdi: cannot run /nonexistent/nvidia-ctk"):
        run_command(config, ["/nonexistent/nvidia-ctk", "cdi"], print, title="cdi")


# ---------------------------------------------------------------- `appliance up`: hostile input


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not json", "Invalid JSON"),
        (b"[1, 2]", "Input should be an object"),
        (b'{"host_class": "cpu_only"}', "cpu_count: Field required"),
        (b"\xff\xfe\x00", "not UTF-8 text"),
    ],
)
def test_bad_snapshot_is_one_line_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, message: str
) -> None:
    bad = tmp_path / "host.json"
    bad.write_bytes(content)
    assert main(["up", "--dry-run", "--host-snapshot", str(bad)]) == 3
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"appliance: error: {bad}: ") and message in err[0]
    assert err[1].startswith("  hint: ") and len(err) == 2


@pytest.mark.parametrize(
    ("args", "needs"),
    [
        (["up", "--host-snapshot", str(FIXTURES / "hosts" / "cpu_only.json")], "--dry-run only"),
        (["up", "--json"], "--json goes with --dry-run"),
    ],
)
def test_a_recorded_host_never_runs(
    isolated_env: Path, capsys: pytest.CaptureFixture[str], args: list[str], needs: str
) -> None:
    assert main(args) == 2
    assert needs in capsys.readouterr().err
    assert not (isolated_env / "state").exists()  # nothing started, nothing written


def test_a_blocked_real_run_starts_nothing(
    isolated_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`appliance up --container` on a host without Podman: one line and the fix, and no
    supervisor (PATH is empty here: no podman to find)."""
    assert main(["up", "--container"]) == 6
    err = capsys.readouterr().err.splitlines()
    assert err[0].endswith("podman is not installed"), err
    assert err[0].startswith("appliance: error: appliance image (")
    assert "setup.sh" in err[1]
    run = isolated_env / "state" / "run"
    assert not (run / "supervisor.pid").exists() and not (run / "services.json").exists()


def test_the_scripts_variables_are_not_config_keys() -> None:
    """scripts/appliance-up.sh runs `appliance` with APPLIANCE_NO_AGENT=1 in its environment."""
    env = {**os.environ, "APPLIANCE_NO_AGENT": "1", "APPLIANCE_VENV": "/opt/venv"}
    assert load_config({}, env).inference.backend == "auto"


def test_probe_of_this_host_is_live_and_starts_nothing(isolated_env: Path) -> None:
    from appliance.bringup.facts import probe
    from hardware.telemetry import collect

    config = load_config({})
    snapshot = collect()
    plan = plan_serving(snapshot, config.inference.vllm)
    facts = probe(config, snapshot, plan, image="localhost/appliance-none:latest")
    assert facts.live and facts.root == (os.geteuid() == 0)
    assert facts.podman is None  # PATH is empty here
    assert facts.image is not None and facts.image.present is None  # no podman to ask
    assert facts.free_bytes is not None and facts.free_bytes > 0
    assert facts.supervisor_pid is None
    assert not (isolated_env / "state").exists()
