"""The Ansible collection under ansible/ is lint-clean: yamllint, ansible-lint (production profile)
and `ansible-playbook --syntax-check` on playbooks/site.yml, each run as a real subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ANSIBLE_DIR = Path(__file__).resolve().parents[2] / "ansible"
ROLES = (
    "appliance_host",
    "appliance_nvidia",
    "appliance_install",
    "appliance_models",
    "appliance_grafana",
)


def _tool(name: str) -> str:
    """The tool from this interpreter's environment first (the `test` extra), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install the project's `test` extra)")
    return found


def _run(argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        # Keep Ansible's and ansible-lint's caches out of $HOME and out of the tree.
        "ANSIBLE_HOME": str(tmp_path / "ansible-home"),
        "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
        "NO_COLOR": "1",
        "PY_COLORS": "0",
    }
    return subprocess.run(
        argv, cwd=ANSIBLE_DIR, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def _assert_clean(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, (
        f"{proc.args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    )


def test_collection_layout() -> None:
    assert (ANSIBLE_DIR / "galaxy.yml").is_file()
    assert (ANSIBLE_DIR / "playbooks" / "site.yml").is_file()
    for group in ("dgx_spark", "rtx", "datacenter"):
        assert (
            ANSIBLE_DIR / "inventories" / "example" / "group_vars" / group / "main.yml"
        ).is_file()
    for role in ROLES:
        base = ANSIBLE_DIR / "roles" / role
        for part in (
            "defaults/main.yml",
            "meta/main.yml",
            "meta/argument_specs.yml",
            "tasks/main.yml",
        ):
            assert (base / part).is_file(), f"{role}/{part}"


def test_role_variables_carry_the_role_prefix() -> None:
    import yaml

    for role in ROLES:
        defaults = yaml.safe_load(
            (ANSIBLE_DIR / "roles" / role / "defaults" / "main.yml").read_text()
        )
        specs = yaml.safe_load(
            (ANSIBLE_DIR / "roles" / role / "meta" / "argument_specs.yml").read_text()
        )
        options = specs["argument_specs"]["main"]["options"]
        assert all(name.startswith(f"{role}_") for name in defaults), role
        assert set(defaults) == set(options), f"{role}: defaults and argument_specs differ"


def test_yamllint(tmp_path: Path) -> None:
    _assert_clean(_run([_tool("yamllint"), "--strict", "."], tmp_path))


def test_ansible_lint_production_profile(tmp_path: Path) -> None:
    proc = _run([_tool("ansible-lint"), "--profile", "production", "--offline"], tmp_path)
    _assert_clean(proc)
    assert "Profile 'production' was required, and it passed" in proc.stdout + proc.stderr


def test_site_playbook_syntax(tmp_path: Path) -> None:
    proc = _run(
        [
            _tool("ansible-playbook"),
            "--syntax-check",
            "-i",
            "inventories/example/hosts.yml",
            "playbooks/site.yml",
        ],
        tmp_path,
    )
    _assert_clean(proc)
