"""`appliance sandbox exec` through the control plane (POST /sandboxes/NAME/exec, which runs
`podman exec -i`): stdin reaches the command whole, stdout and stderr come back apart and byte
for byte, the exit status is the command's, and the command still runs as the agent inside its
Landlock domain. An unknown sandbox is a one-line error with a hint. Real sandbox, installed
CLI, real control plane, as root."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.control_fixtures import running_control_plane
from tests.helpers import cli_env
from tests.sandbox_fixtures import (
    APPLIANCE,
    ensure_base_image,
    run_cli,
    sandbox_skip_reason,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

POLICY = Path(__file__).resolve().parents[2] / "sandbox" / "policies" / "default.yaml"


@pytest.fixture(scope="module")
def sandbox() -> Iterator[tuple[str, dict[str, str]]]:
    if (why := sandbox_skip_reason()) is not None:
        pytest.skip(why)
    ensure_base_image()
    scratch = Path(tempfile.mkdtemp(prefix="ex-"))
    env = cli_env(scratch / "s", scratch)
    name = f"h1-exec-{os.getpid()}"
    try:
        with running_control_plane(env, scratch / "s"):
            made = run_cli("sandbox", "create", name, "--policy", str(POLICY), env=env)
            assert made.returncode == 0, made.stderr
            try:
                yield name, env
            finally:
                run_cli("sandbox", "rm", name, env=env)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _exec(sandbox: tuple[str, dict[str, str]], *cmd: str, stdin: bytes = b""):
    name, env = sandbox
    return subprocess.run(
        [APPLIANCE, "sandbox", "exec", name, "--", *cmd],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=120,
    )


def test_stdin_reaches_the_command(sandbox) -> None:
    proc = _exec(sandbox, "python3", "-", stdin=b"print(1)\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"1\n"


def test_a_megabyte_of_stdin_arrives_whole(sandbox) -> None:
    data = os.urandom(1 << 20)
    proc = _exec(sandbox, "sha256sum", stdin=data)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_the_exit_status_is_the_commands(sandbox) -> None:
    assert _exec(sandbox, "sh", "-c", "exit 7").returncode == 7
    failed = _exec(sandbox, "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (failed.returncode, failed.stdout, failed.stderr) == (3, b"out\n", b"err\n")


def test_exec_still_runs_as_the_agent_under_landlock(sandbox) -> None:
    proc = _exec(sandbox, "sh", "-c", "id -u; echo x > /etc/probe", stdin=b"")
    assert proc.stdout == b"1000\n" and proc.returncode != 0
    assert b"/etc/probe" in proc.stderr  # refused: read-only root and Landlock


def test_an_unknown_sandbox_is_one_line_with_a_hint(sandbox) -> None:
    _name, env = sandbox
    proc = run_cli("sandbox", "exec", f"nosuch-{os.getpid()}", "--", "true", env=env)
    assert proc.returncode == 5, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == f"appliance: error: no sandbox named 'nosuch-{os.getpid()}'", lines
    assert lines[1] == "  hint: `appliance sandbox list`", lines
