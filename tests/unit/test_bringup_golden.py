"""`appliance up --dry-run --host-snapshot`: the bring-up of each recorded host class, through the
real CLI, as golden files (the steps and every command they would run).

Regenerate the goldens after a deliberate change with
    UPDATE_GOLDEN=1 pytest tests/unit/test_bringup_golden.py
and read the diff: each file is what the dry run prints for that host.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from appliance.cli.main import app
from tests.conftest import FIXTURES
from tests.helpers import GOLDEN, UPDATE_GOLDEN, assert_golden

GOLDEN_DIR = GOLDEN / "bringup"
STATE_DIR = "/var/lib/appliance"
# (golden name, host fixture, extra flags)
CASES = [
    ("dgx_spark_gb10", "dgx_spark_gb10", []),
    ("rtx_pro_6000_96gb", "rtx_pro_6000_96gb", []),
    ("rtx_4090_24gb", "rtx_4090_24gb", []),
    ("h100_80gb_x2", "h100_80gb_x2", []),
    ("cpu_only", "cpu_only", []),
    ("cpu_only-container", "cpu_only", ["--container"]),
]


CHECKOUT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def fixed_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Default config but the state dir: default ports, no `vllm` on PATH (the venv has none),
    the venv in the checkout (.venv, as scripts/setup.sh makes it) wherever this one is."""
    monkeypatch.delenv("APPLIANCE_CONTROL__PORT", raising=False)
    monkeypatch.delenv("APPLIANCE_STATE_DIR", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setattr(sys, "executable", str(CHECKOUT / ".venv" / "bin" / "python"))


def dry_run(host: str, *flags: str) -> str:
    snapshot = FIXTURES / "hosts" / f"{host}.json"
    args = ["--state-dir", STATE_DIR, "up", "--dry-run", "--host-snapshot", str(snapshot), *flags]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert str(CHECKOUT) not in result.stdout  # nothing of this machine's paths
    return result.stdout


def test_every_case_has_a_golden_and_no_golden_is_stale() -> None:
    if not UPDATE_GOLDEN:
        assert sorted(p.stem for p in GOLDEN_DIR.glob("*.txt")) == sorted(n for n, _, _ in CASES)


@pytest.mark.parametrize(("name", "host", "flags"), CASES, ids=[c[0] for c in CASES])
def test_golden_dry_run(name: str, host: str, flags: list[str]) -> None:
    assert_golden(GOLDEN_DIR / f"{name}.txt", dry_run(host, *flags))


def test_dry_run_touches_nothing(tmp_path: Path) -> None:
    """A recorded host is planned, not probed: the state dir is not even created."""
    state = tmp_path / "state"
    snapshot = FIXTURES / "hosts" / "dgx_spark_gb10.json"
    args = ["--state-dir", str(state), "up", "--dry-run", "--host-snapshot", str(snapshot)]
    assert CliRunner().invoke(app, args).exit_code == 0
    assert not state.exists()


@pytest.mark.parametrize(
    ("host", "flags", "path", "target", "embedded_on_host", "steps"),
    [
        ("cpu_only", [], "host", None, True, ["setup", "serve", "agent", "status"]),
        (
            "cpu_only",
            ["--container"],
            "container",
            "cpu",
            False,
            ["setup", "image", "serve", "agent", "status"],
        ),
        (
            "dgx_spark_gb10",
            [],
            "container",
            "spark",
            False,
            ["setup", "image", "cdi", "weights", "serve", "agent", "status"],
        ),
        (
            "rtx_4090_24gb",
            [],
            "container",
            "rtx",
            False,
            ["setup", "image", "cdi", "weights", "serve", "agent", "status"],
        ),
    ],
)
def test_json_says_which_path(
    host: str,
    flags: list[str],
    path: str,
    target: str | None,
    embedded_on_host: bool,
    steps: list[str],
) -> None:
    """What scripts/appliance-up.sh reads: the path, and whether setup.sh embedded is needed."""
    out = json.loads(dry_run(host, *flags, "--json"))
    assert (out["path"], out["target"], out["embedded_on_host"]) == (
        path,
        target,
        embedded_on_host,
    )
    assert [s["id"] for s in out["steps"]] == steps
    assert out["recorded"] is True
    assert all(s["state"] in ("todo", "skip") for s in out["steps"])
    serve = next(s for s in out["steps"] if s["id"] == "serve")
    backend = serve["commands"][-1]
    if path == "container":
        # The serve step runs the very image the image step builds.
        assert f"localhost/appliance-{target}:latest" in backend
        assert "--network=host" in backend and "--read-only" in backend
        assert ("--device=nvidia.com/gpu=all" in backend) == (target != "cpu")
    else:
        assert "podman" not in backend and "inference.embedded" in backend
