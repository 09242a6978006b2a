"""`appliance sandbox create` with a bad policy file, as a real subprocess: exit code 3 (the
ConfigError row of appliance/errors.py), one `FILE:LINE: ...` error line plus its hint on stderr,
no traceback, and nothing started: no store record or policy revision, no sandbox directories,
no egress proxy, and (where Podman is usable) no container.

The policy is parsed by the CLI before anything is sent to the control plane (none runs here), so
these run on any machine; as root they also run as an unprivileged user, to show the policy
error comes first there too.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.errors import ConfigError, exit_code_for
from tests.helpers import cli_env
from tests.sandbox_fixtures import (
    podman_client,
    proxy_pids,
    run_cli,
    sandbox_skip_reason,
    service_home,
)

pytestmark = pytest.mark.integration

NOBODY = 65534

# name -> (file text, line the error names, what the message says)
CASES: dict[str, tuple[str, int, str]] = {
    "yaml-syntax": (
        "version: 1\nfilesystem:\n  read_write:\n    - /tmp\n   bad: [\n",
        5,
        "expected <block end>",
    ),
    "unknown-field": (
        "version: 1\nfilesystem:\n  read_only: []\n  read_writ:\n    - /tmp\n",
        4,
        "filesystem.read_writ: unknown field",
    ),
    "writable-root": (
        # the error names the read_write key (the list), not the '/' item
        "version: 1\nfilesystem:\n  read_write:\n    - /home/agent\n    - /\n",
        3,
        "filesystem.read_write: '/' is never writable",
    ),
    "root-uid": (
        "version: 1\nprocess:\n  uid: 0\n  gid: 1000\n",
        3,
        "process.uid: Input should be greater than or equal to 1",
    ),
    "bad-host-pattern": (
        "version: 1\nnetwork:\n  allow:\n    - host: api.example.com\n"
        '    - host: "api.*.example.com"\n      ports: [443]\n',
        5,
        "network.allow.1.host: 'api.*.example.com': a host name",
    ),
    "not-a-mapping": ("# a list, not a policy\n- version: 1\n", 2, "expected a mapping"),
}


@pytest.fixture
def workdir() -> Iterator[Path]:
    """World-readable (pytest's tmp_path is 0700 for root): the unprivileged run reads it."""
    path = Path(tempfile.mkdtemp(prefix="sandbox-cli-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _create(workdir: Path, case: str, user: int | None = None):
    text, _line, _what = CASES[case]
    bad = workdir / f"{case}.yaml"
    bad.write_text(text)
    bad.chmod(0o644)
    state = workdir / "state"
    env = cli_env(state, workdir)
    env["HOME"] = str(workdir)
    name = f"cli-bad-{case}-{os.getpid()}"
    proc = run_cli("sandbox", "create", name, "--policy", str(bad), env=env, user=user)
    return proc, bad, state, name


def _assert_one_line_error(proc, bad: Path, case: str) -> None:
    _text, line, what = CASES[case]
    assert proc.returncode == exit_code_for(ConfigError("")) == 3, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    errors = [x for x in lines if x.startswith("appliance: error:")]
    assert len(errors) == 1, proc.stderr
    assert re.match(rf"appliance: error: {re.escape(str(bad))}:{line}(:\d+)?: ", errors[0]), lines
    assert what in errors[0], errors[0]
    assert all(x is errors[0] or x.startswith("  hint: ") for x in lines), lines


def _assert_nothing_started(state: Path, name: str) -> None:
    assert not (state / "sandboxes" / name).exists()
    home = service_home()
    if home is not None:
        assert not (home / "sandboxes" / name).exists()
    assert not proxy_pids(name, state)
    if (state / "appliance.db").exists():
        from appliance.store import open_store
        from appliance.store.sandbox_store import SandboxStore

        with open_store(state) as store:
            boxes = SandboxStore(store)
            assert boxes.get(name) is None
            assert boxes.latest_policy(name) is None  # not even a revision


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_policy_is_one_line_and_starts_nothing(workdir: Path, case: str) -> None:
    proc, bad, state, name = _create(workdir, case)
    _assert_one_line_error(proc, bad, case)
    _assert_nothing_started(state, name)
    if sandbox_skip_reason() is None:  # Podman usable here: not even a created container
        names = {c.name for c in podman_client().containers.list(all=True)}
        assert name not in names


@pytest.mark.skipif(os.geteuid() != 0, reason="already unprivileged: the test above covers it")
@pytest.mark.parametrize("case", ["unknown-field", "root-uid"])
def test_bad_policy_reported_before_the_root_check(workdir: Path, case: str) -> None:
    # An unprivileged caller would be refused ("managed by root", exit 7) after parsing: the
    # policy error must come first, with the same exit code and message.
    proc, bad, state, name = _create(workdir, case, user=NOBODY)
    _assert_one_line_error(proc, bad, case)
    _assert_nothing_started(state, name)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as another user")
def test_valid_policy_as_unprivileged_user_goes_on_to_the_control_plane(workdir: Path) -> None:
    # The control for the test above: the same call with a *valid* policy gets past parsing and
    # on to sending it (no control plane runs on this state dir: exit 7, `appliance up`), so
    # the exit-3 answers really come from the policy.
    good = workdir / "good.yaml"
    good.write_text("version: 1\n")
    good.chmod(0o644)
    env = cli_env(workdir / "state", workdir)
    env["HOME"] = str(workdir)
    proc = run_cli("sandbox", "create", "cli-good", "--policy", str(good), env=env, user=NOBODY)
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 7, proc.stderr
    assert proc.stderr.startswith("appliance: error: the control plane is not running"), proc.stderr
    assert "hint: start it with `appliance up`" in proc.stderr
