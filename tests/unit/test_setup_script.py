"""scripts/setup.sh's install decision: a stamp of this pyproject whose extras include the
requested ones is enough (appliance-up.sh's `setup.sh` beside a suite set up with
`setup.sh embedded,test` must not reinstall the package under the running tests)."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "setup.sh"
PYPROJECT_HASH = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:16]


def run_setup(tmp_path: Path, stamps: list[str], extras: str | None) -> tuple[list[str], set[str]]:
    """setup.sh on a venv whose `python` only records its calls, with these stamps; what it ran
    and the stamps it left."""
    venv, calls = tmp_path / "venv", tmp_path / "calls.log"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    python.chmod(0o755)
    for stamp in stamps:
        (venv / f".installed-{stamp}").touch()
    # Every system package "installed" (the test extra's Chromium too): no apt-get here, ever.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir / "dpkg-query", 'echo "install ok installed"\n')
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "APPLIANCE_VENV": str(venv)}
    env["APPLIANCE_NO_SANDBOX"] = "1"
    argv = [str(SCRIPT)] + ([extras] if extras is not None else [])
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    ran = calls.read_text().splitlines() if calls.exists() else []
    left = {p.name.removeprefix(".installed-") for p in venv.glob(".installed-*")}
    return ran, left


@pytest.mark.parametrize(
    ("stamp", "extras"),
    [
        ("embedded,test", None),  # the base install after the suite's own
        ("embedded,test", "embedded"),
        ("embedded,test", "test,embedded"),  # the order does not matter
        ("base", None),
        ("embedded", "embedded"),
    ],
)
def test_a_stamp_whose_extras_cover_the_request_installs_nothing(
    tmp_path: Path, stamp: str, extras: str | None
) -> None:
    ran, left = run_setup(tmp_path, [f"{PYPROJECT_HASH}-{stamp}"], extras)
    assert ran == []
    assert left == {f"{PYPROJECT_HASH}-{stamp}"}  # nothing added, nothing removed


@pytest.mark.parametrize(
    ("stamps", "extras"),
    [
        (["{hash}-base"], "embedded"),  # the base stamp does not cover an extra
        (["{hash}-test"], "embedded,test"),  # only part of the request
        (["{hash}-embedded-gpu"], "embedded"),  # a longer name is not the extra
        (["0123456789abcdef-embedded,test"], None),  # another pyproject's stamp
        ([], None),
    ],
)
def test_a_request_no_stamp_covers_installs_and_stamps_it(
    tmp_path: Path, stamps: list[str], extras: str | None
) -> None:
    stamps = [s.format(hash=PYPROJECT_HASH) for s in stamps]
    ran, left = run_setup(tmp_path, stamps, extras)
    spec = f".[{extras}]" if extras else "."
    assert f"-m pip install -q --disable-pip-version-check -e {spec}" in ran, ran
    requested = f"{PYPROJECT_HASH}-{extras or 'base'}"
    # Its stamp added; this pyproject's other stamps kept, another pyproject's removed.
    assert left == {requested} | {s for s in stamps if s.startswith(PYPROJECT_HASH)}


# -- system packages: the browser tests' Chromium comes with the `test` extra only --------------

BROWSER = ("chromium", "chromium-driver")


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def apt_calls(tmp_path: Path, extras: str | None) -> tuple[list[str], str]:
    """setup.sh on a host that has every package but the browser (stand-ins for dpkg-query,
    apt-get and sudo on PATH: nothing is installed) and a venv stamped for every extra: its
    apt-get calls and its output."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "apt.log"
    bin_dir.mkdir()
    missing = " ".join(BROWSER)
    _stub(
        bin_dir / "dpkg-query",
        f'for pkg in {missing}; do [ "$3" = "$pkg" ] && exit 1; done\n'
        'echo "install ok installed"\n',
    )
    _stub(bin_dir / "apt-get", f'echo "$*" >> {calls}\n')
    _stub(bin_dir / "sudo", 'exec "$@"\n')  # when the suite is not run as root
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    _stub(venv / "bin" / "python", "exit 0\n")
    (venv / f".installed-{PYPROJECT_HASH}-embedded,test").touch()
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "APPLIANCE_VENV": str(venv)}
    env["APPLIANCE_NO_SANDBOX"] = "1"
    argv = [str(SCRIPT)] + ([extras] if extras is not None else [])
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return (calls.read_text().splitlines() if calls.exists() else []), done.stdout


@pytest.mark.parametrize("extras", ["test", "embedded,test"])
def test_the_test_extra_installs_chromium_and_its_driver(tmp_path: Path, extras: str) -> None:
    apt, out = apt_calls(tmp_path, extras)
    assert apt == ["update -qq", "install -y -qq --no-install-recommends " + " ".join(BROWSER)]
    assert f"installing system packages: {' '.join(BROWSER)}" in out


@pytest.mark.parametrize("extras", [None, "embedded"])  # appliance-up.sh's set-ups
def test_other_set_ups_install_no_browser(tmp_path: Path, extras: str | None) -> None:
    apt, _ = apt_calls(tmp_path, extras)
    assert apt == []
