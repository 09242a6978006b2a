"""The rendered units pass systemd's own checker (`systemd-analyze verify`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.services.systemd import render_all

pytestmark = pytest.mark.integration


def test_systemd_analyze_verify_accepts_every_unit(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    units = render_all(
        executable=str(Path(sys.executable).parent / "appliance"),  # must exist for verify
        state_dir=tmp_path / "state",
        config_file=tmp_path / "config.yaml",
    )
    for name, text in units.items():
        (tmp_path / name).write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / n) for n in units)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def _exec_word(arg: str) -> str:
    """One ExecStart word, quoted the way systemd splits command lines (systemd.service(5))."""
    assert "%" not in arg and "$" not in arg  # specifiers / variables: see the unit test
    if arg and not any(c in arg for c in " \t\"'\\;"):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def test_quadlet_sections_and_argv_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """Podman 4.3 here has no Quadlet generator; what it would pass through untouched ([Unit],
    [Service], [Install]) plus an ExecStart of the equivalent `podman run` must be a unit
    systemd accepts (a stand-in for the generated appliance-inference.service)."""
    if shutil.which("systemd-analyze") is None or shutil.which("podman") is None:
        pytest.skip("systemd-analyze or podman is not installed")
    from appliance.services import quadlet as q

    for target in sorted(q.RUNTIMES):
        spec = q.spec_for(
            f"localhost/appliance-{target}:latest",
            models_dir=tmp_path / "models",
            config_file=tmp_path / "appliance.yaml",
        )
        text = q.render_container(spec)
        head, _, rest = text.partition("[Container]\n")
        _, _, tail = rest.partition("\n[Service]\n")
        argv = [shutil.which("podman") or "podman", *spec.podman_run_argv()[1:]]
        service = (
            f"{head}\n[Service]\nType=notify\nNotifyAccess=all\nKillMode=mixed\n"
            f"ExecStart={' '.join(_exec_word(a) for a in argv)}\n{tail}"
        )
        unit = tmp_path / f"appliance-inference-{target}.service"
        unit.write_text(service)
        done = subprocess.run(
            ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0 and not done.stderr.strip(), (target, done.stderr)
