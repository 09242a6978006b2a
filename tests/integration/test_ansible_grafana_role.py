"""The appliance_grafana role, run for real by ansible-playbook against this host (local
connection): unset, it does nothing; pointed at Grafana's dashboards directory, it installs the
collection's dashboard byte for byte and a second run changes nothing; pointed at a directory
that does not exist, it fails naming it and creates nothing."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ANSIBLE_DIR = Path(__file__).resolve().parents[2] / "ansible"
DASHBOARD = ANSIBLE_DIR / "roles" / "appliance_grafana" / "files" / "appliance.json"
PLAY = """\
- name: Install the appliance dashboard
  hosts: localhost
  gather_facts: false
  roles:
    - role: appliance_grafana
"""


def _playbook_tool() -> str:
    beside = Path(sys.executable).parent / "ansible-playbook"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("ansible-playbook")
    if found is None:
        pytest.skip("ansible-playbook is not installed (pip install the project's `test` extra)")
    return found


def run_role(tmp_path: Path, **extra_vars: str) -> subprocess.CompletedProcess[str]:
    playbook = tmp_path / "grafana.yml"
    playbook.write_text(PLAY)
    owner = {
        "appliance_grafana_dashboard_owner": pwd.getpwuid(os.getuid()).pw_name,
        "appliance_grafana_dashboard_group": grp.getgrgid(os.getgid()).gr_name,
    }
    variables = json.dumps({**owner, **extra_vars})  # JSON: a path may hold spaces
    argv = [_playbook_tool(), "-i", "localhost,", "-c", "local", "-e", variables, str(playbook)]
    env = {
        **os.environ,
        "ANSIBLE_HOME": str(tmp_path / "ansible-home"),
        "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"),
        "ANSIBLE_ROLES_PATH": str(ANSIBLE_DIR / "roles"),
        "ANSIBLE_PYTHON_INTERPRETER": sys.executable,
        "ANSIBLE_NOCOLOR": "1",
    }
    return subprocess.run(
        argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def recap(proc: subprocess.CompletedProcess[str]) -> str:
    [line] = [ln for ln in proc.stdout.splitlines() if ln.startswith("localhost ")]
    return " ".join(line.split()[2:])


def test_unset_does_nothing(tmp_path: Path) -> None:
    proc = run_role(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "changed=0" in recap(proc) and "failed=0" in recap(proc)
    assert not list(tmp_path.rglob("appliance.json"))


def test_installs_the_dashboard_once(tmp_path: Path) -> None:
    dashboards = tmp_path / "grafana" / "dashboards"
    dashboards.mkdir(parents=True, mode=0o750)
    first = run_role(tmp_path, appliance_grafana_dashboards_dir=str(dashboards))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "changed=1" in recap(first)
    installed = dashboards / "appliance.json"
    assert installed.read_bytes() == DASHBOARD.read_bytes()
    assert installed.stat().st_mode & 0o777 == 0o644
    assert dashboards.stat().st_mode & 0o777 == 0o750  # Grafana's directory is left as it was
    again = run_role(tmp_path, appliance_grafana_dashboards_dir=str(dashboards))
    assert again.returncode == 0 and "changed=0" in recap(again), again.stdout


def test_a_missing_directory_fails_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such dir"
    proc = run_role(tmp_path, appliance_grafana_dashboards_dir=str(missing))
    assert proc.returncode != 0
    assert f"appliance_grafana_dashboards_dir {missing} is not a directory" in proc.stdout
    assert not missing.exists() and not missing.parent.exists()
