"""The bring-up steps on live-like facts (what each state means and the fix it names), the runner's
refusals and relays, and `appliance up`'s hostile input: bad snapshot files, flag combinations
that would run something on a recorded host."""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from appliance.cli.main import main
from appliance.config import ApplianceConfig, load_config
from appliance.errors import ApplianceError, PreflightError, exit_code_for
from appliance.services.bringup.facts import Facts, recorded
from appliance.services.bringup.run import _cdi, refuse_blocked, run_command
from appliance.services.bringup.steps import GIB, TOOLKIT_FIX, Options, Step, plan_steps
from hardware.planner import plan_serving
from hardware.snapshot import HostSnapshot
from tests.conftest import FIXTURES

STATE = Path("/var/lib/appliance")
SPARK = "dgx_spark_gb10"
# A GPU host as `probe()` would see it when everything is in place.
READY = Facts(
    live=True,
    root=True,
    podman=(5, 4),
    systemd=True,
    nvidia_ctk="/usr/bin/nvidia-ctk",
    cdi_spec="/etc/cdi/nvidia.yaml",
    free_bytes=2000 * GIB,
    image=True,
    weights=True,
    weights_detail="complete in /var/lib/appliance/models/hf/hub",
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


# ---------------------------------------------------------------- states on a live host


def test_everything_in_place_is_done_and_only_serve_is_left() -> None:
    steps = steps_for(SPARK, READY)
    assert list(steps) == ["setup", "image", "cdi", "weights", "serve", "agent", "status"]
    for done in ("setup", "image", "cdi", "weights"):
        assert steps[done].state == "done", steps[done]
    assert steps["image"].commands == [] and steps["weights"].commands == []
    assert steps["serve"].state == "todo"


def test_image_absent_is_built_and_podman_absent_is_blocked() -> None:
    image = steps_for(SPARK, replace(READY, image=False))["image"]
    assert image.state == "todo"
    assert image.commands == [["appliance", "image", "build", "--target", "spark", "--pull"]]
    assert "appliance bundle install" in image.why  # the offline way
    cpu = steps_for("cpu_only", replace(READY, image=False), backend="container")["image"]
    assert cpu.commands == [["appliance", "image", "build", "--target", "cpu"]]  # built here
    blocked = steps_for(SPARK, replace(READY, podman=None, image=None))["image"]
    assert blocked.state == "blocked" and blocked.fix and "setup.sh" in blocked.fix


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


def test_weights_absent_are_downloaded_and_a_short_disk_is_blocked() -> None:
    todo = steps_for(SPARK, replace(READY, weights=False))["weights"]
    assert todo.state == "todo"
    assert todo.commands == [
        [
            "env",
            "HF_HOME=/var/lib/appliance/models/hf",
            "hf",
            "download",
            "nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-NVFP4",
        ]
    ]
    short = steps_for(SPARK, replace(READY, weights=False, free_bytes=10 * GIB))["weights"]
    assert short.state == "blocked"
    assert "only 10.0 GiB free" in short.why and "models_dir" in (short.fix or "")


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
    assert serve.commands[0][:2] == ["env", "APPLIANCE_INFERENCE__BACKEND=container"]
    assert serve.commands[0][2] == sys.executable
    # and that variable is what the supervisor's config reads
    assert load_config({}, {"APPLIANCE_INFERENCE__BACKEND": "container"}).inference.backend == (
        "container"
    )


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
    from appliance.services.bringup.facts import probe
    from hardware.telemetry import collect

    config = load_config({})
    snapshot = collect()
    plan = plan_serving(snapshot, config.inference.vllm)
    facts = probe(config, snapshot, plan, image="localhost/appliance-none:latest")
    assert facts.live and facts.root == (os.geteuid() == 0)
    assert facts.podman is None  # PATH is empty here
    assert facts.image is None  # no podman to ask
    assert facts.free_bytes is not None and facts.free_bytes > 0
    assert facts.supervisor_pid is None
    assert not (isolated_env / "state").exists()


def test_a_backend_that_fails_to_start_is_one_line(
    isolated_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """vLLM out of memory at start (after its step-downs): the log's tail for context, then the
    backend's own detail as the one line (it says what to do)."""
    import json
    import subprocess

    from appliance.cli.lifecycle import _wait_ready
    from appliance.errors import BackendError

    config = load_config({})
    log = isolated_env / "backend.log"
    log.write_text("INFO loading\nERROR CUDA out of memory. Tried to allocate 2.00 GiB\n")
    oom = (
        "vLLM runs out of memory at start even at --gpu-memory-utilization 0.70 and "
        "--max-model-len 32768 (floors 0.70 and 32768): CUDA out of memory. Free GPU memory "
        "held by other processes, or plan a smaller model.\nTraceback ..."
    )
    run = config.state_dir / "run"
    run.mkdir(parents=True)
    services = {
        "instance": "i1",
        "control": {"state": "ready"},
        "gateway": {"state": "starting"},
        "backend": {"state": "failed", "detail": oom, "log": str(log)},
    }
    (run / "services.json").write_text(json.dumps(services))
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(BackendError) as caught:
            _wait_ready(config, proc, "i1", timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert str(caught.value) == f"backend failed to start: {oom.splitlines()[0]}"
    assert "\n" not in str(caught.value) and "above" in (caught.value.hint or "")
    assert "CUDA out of memory. Tried to allocate" in capsys.readouterr().err
