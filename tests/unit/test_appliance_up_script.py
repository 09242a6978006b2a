"""scripts/appliance-up.sh: its dry run prints the steps and starts nothing; its flags are checked
before anything runs."""

from __future__ import annotations

import hashlib
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, REPO
from tests.helpers import cli_env

SCRIPT = REPO / "scripts" / "appliance-up.sh"
VENV = Path(sys.prefix)  # the venv running these tests has `appliance` in bin/
# What a run that starts something would call first: each stub records its call and fails.
STUBS = ("podman", "nvidia-ctk", "hf", "apt-get", "sudo", "systemctl", "runuser", "pip")


@pytest.fixture
def stubbed(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """The script's environment: a fresh state dir, this venv, stubs first on PATH."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for name in STUBS:
        stub = bin_dir / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\nexit 1\n')
        stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    env = cli_env(tmp_path / "state", tmp_path, APPLIANCE_VENV=str(VENV))
    env["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    return env, calls


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_dry_run_of_a_recorded_spark_prints_every_step_and_starts_nothing(
    stubbed: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    env, calls = stubbed
    assert (VENV / "bin" / "appliance").exists(), "the tests' venv has no `appliance` script"
    snapshot = FIXTURES / "hosts" / "dgx_spark_gb10.json"
    done = run(env, "--dry-run", "--host-snapshot", str(snapshot))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    titles = ["set up", "appliance image (spark)", "CDI spec (nvidia.com/gpu)", "model weights"]
    titles += ["serve", "demo agent", "status"]
    for n, title in enumerate(titles, 1):
        assert f"\n{n}. {title} [todo]: " in out, title
    for command in (
        "$ scripts/setup.sh",
        "$ appliance image build --target spark --pull",
        "$ nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml",
        "hf download nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-NVFP4",
        "serve all --instance",
        "podman --runtime runc run --rm --replace",
        "$ appliance status",
    ):
        assert command in out, command
    assert not calls.exists(), calls.read_text()  # no podman, toolkit, download, apt, sudo
    assert not (tmp_path / "state").exists()  # not even the state dir


def test_dry_run_without_the_venv_says_setup_comes_first(
    stubbed: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    env, calls = stubbed
    env["APPLIANCE_VENV"] = str(tmp_path / "no-venv")
    done = run(env, "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "$ scripts/setup.sh" in done.stdout and "--dry-run again" in done.stdout
    assert not calls.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--host-snapshot", "x.json"], "--host-snapshot is for --dry-run only"),
        (["--dry-run", "--host-snapshot"], "--host-snapshot needs a FILE"),
        (["--bogus"], "unknown option: --bogus"),
    ],
)
def test_bad_flags_stop_before_anything_runs(
    stubbed: tuple[dict[str, str], Path], args: list[str], message: str
) -> None:
    env, calls = stubbed
    done = run(env, *args)
    assert done.returncode == 2
    assert f"appliance-up: {message}" in done.stderr
    assert not calls.exists()


@pytest.fixture
def fake_venv(tmp_path: Path) -> tuple[dict[str, str], Path, Path]:
    """A venv whose `appliance` and `python` record their calls (python runs the script's JSON
    one-liner for real): the script's real path without installing or starting anything.
    setup.sh finds its base stamp (nothing to install) unless asked for the embedded extra."""
    venv, calls = tmp_path / "venv", tmp_path / "calls.log"
    (venv / "bin").mkdir(parents=True)
    pyproject_hash = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:16]
    (venv / f".installed-{pyproject_hash}-base").touch()
    python = venv / "bin" / "python"
    python.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = -c ]; then exec {sys.executable} "$@"; fi\n'
        f'echo "python $*" >> {calls}\n'
    )
    appliance = venv / "bin" / "appliance"
    appliance.write_text(
        "#!/bin/sh\n"
        f'echo "appliance $*" >> {calls}\n'
        'case "$*" in\n'
        '  *--dry-run*--json*) echo "{\\"embedded_on_host\\": $FAKE_EMBEDDED}";;\n'
        '  up|"up --container") exit "${FAKE_UP_EXIT:-0}";;\n'
        "esac\n"
    )
    for script in (python, appliance):
        script.chmod(0o755)
    env = cli_env(tmp_path / "state", tmp_path, APPLIANCE_VENV=str(venv))
    env.update(APPLIANCE_NO_SANDBOX="1", APPLIANCE_NO_AGENT="1", PATH="/usr/bin:/bin")
    return env, calls, venv


def test_embedded_on_the_host_gets_its_extra_then_up_and_status(
    fake_venv: tuple[dict[str, str], Path, Path],
) -> None:
    env, calls, _ = fake_venv
    done = run({**env, "FAKE_EMBEDDED": "true"})
    assert done.returncode == 0, done.stderr
    lines = calls.read_text().splitlines()
    assert lines[0] == "appliance up --dry-run --json"
    assert "python -m pip install -q --disable-pip-version-check -e .[embedded]" in lines
    assert lines[-2:] == ["appliance up", "appliance status"]


def test_the_container_path_skips_the_embedded_extra(
    fake_venv: tuple[dict[str, str], Path, Path],
) -> None:
    env, calls, _ = fake_venv
    done = run({**env, "FAKE_EMBEDDED": "false"}, "--container")
    assert done.returncode == 0, done.stderr
    assert calls.read_text().splitlines() == [
        "appliance up --dry-run --json --container",
        "appliance up --container",
        "appliance status",
    ]


def test_a_failed_up_stops_the_script(fake_venv: tuple[dict[str, str], Path, Path]) -> None:
    env, calls, _ = fake_venv
    done = run({**env, "FAKE_EMBEDDED": "false", "FAKE_UP_EXIT": "6"})
    assert done.returncode == 6
    assert calls.read_text().splitlines()[-1] == "appliance up"  # no agent, no status
