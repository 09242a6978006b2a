"""The installed CLI as a real subprocess: exit codes, stdout/stderr discipline, --watch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

APPLIANCE = str(Path(sys.executable).parent / "appliance")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [APPLIANCE, *args], capture_output=True, text=True, timeout=60, env=env or os.environ.copy()
    )


def test_console_script_status_json() -> None:
    proc = run("status", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["appliance"]["version"]


def test_version_and_help() -> None:
    assert run("--version").stdout.startswith("appliance ")
    help_text = run("--help").stdout
    for command in ("status", "hardware", "plan", "doctor", "up", "config"):
        assert command in help_text


def test_unknown_flag_is_usage_error() -> None:
    proc = run("status", "--bogus")
    assert proc.returncode == 2
    assert "No such option" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_config_exit_code_and_debug_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("inference:\n  backend: quantum\n")
    env = {**os.environ, "APPLIANCE_CONFIG": str(bad)}
    proc = run("status", env=env)
    assert proc.returncode == 3
    assert proc.stderr.startswith(f"appliance: error: {bad}:2: inference.backend: ")
    assert "Traceback" not in proc.stderr
    debug = run("status", env={**env, "APPLIANCE_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_watch_redraws_until_interrupted() -> None:
    proc = subprocess.Popen(
        [APPLIANCE, "status", "--watch", "--json", "--interval", "0.3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    documents = [d for d in out.split("\n}\n") if d.strip()]
    assert len(documents) >= 2  # it redrew at least once
    assert json.loads(documents[0] + "\n}")["host"]["cpu_count"] >= 1
