"""The doctor's runner and command against a fake host tree (tests/unit/doctor_host.py): every
check passes on a healthy host, a failure carries a fix, a crash becomes a result, and
`appliance doctor` prints, exits and sizes the disk check from the serving plan.

Each check's own ok and failure paths: test_doctor_sandbox_host.py, test_doctor_serving_host.py."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from appliance.ops.doctor import CHECKS, CheckResult, DoctorEnv, all_ok, run_checks, sandbox_host
from appliance.ops.doctor.env import run_argv
from hardware.snapshot import HostSnapshot
from tests.conftest import FIXTURES
from tests.unit.doctor_host import (
    CPU_HOST,
    GPU_HOST,
    doctor_env,
    failing_probe,
    healthy_root,
    which_only,
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A healthy host: seccomp, user namespaces, the service user with subids, cgroup v2."""
    return healthy_root(tmp_path)


@pytest.fixture
def env(root: Path, tmp_path: Path) -> DoctorEnv:
    return doctor_env(root, tmp_path)


def test_every_check_passes_on_a_healthy_host(env: DoctorEnv) -> None:
    results = run_checks(env)
    assert [r.name for r in results] == [name for name, _ in CHECKS]
    assert {r.name: r.status for r in results if r.status != "ok"} == {
        "nvidia driver": "skip",
        "container toolkit": "skip",
        "cdi spec": "skip",
    }
    assert all_ok(results)


def test_each_check_reports_its_registered_name(env: DoctorEnv) -> None:
    for name, check in CHECKS:
        assert check(env).name == name


def test_non_ok_results_carry_a_fix(env: DoctorEnv, root: Path) -> None:
    (root / "proc").rename(root / "gone")
    (root / "etc").rename(root / "gone-etc")
    env.which = which_only()
    env.landlock_abi = failing_probe(errno.ENOSYS)
    env.host = GPU_HOST
    for r in run_checks(env):
        if r.status == "fail":
            assert r.fix, r


# ---------------------------------------------------------------- run_checks


def test_crashing_check_becomes_a_failed_result(env: DoctorEnv) -> None:
    def broken(_: DoctorEnv) -> CheckResult:
        raise RuntimeError("boom")

    results = run_checks(env, [("broken", broken), ("landlock", sandbox_host.check_landlock)])
    assert results[0].status == "fail"
    assert results[0].name == "broken"
    assert results[0].detail == "check crashed: RuntimeError: boom"
    assert results[1].status == "ok"
    assert not all_ok(results)


# ---------------------------------------------------------------- the command


def _cli(monkeypatch, results: list[CheckResult], host: HostSnapshot):
    """An app with just `doctor`, telemetry returning `host`, and the checks' results fixed."""
    import typer

    from appliance.cli import doctor as cli

    seen: list[DoctorEnv] = []

    def fake_run_checks(env: DoctorEnv) -> list[CheckResult]:
        seen.append(env)
        return results

    monkeypatch.setattr("hardware.telemetry.collect", lambda: host)
    monkeypatch.setattr(cli, "run_checks", fake_run_checks)
    app = typer.Typer()
    app.command("doctor")(cli.doctor)
    app.command("other")(lambda: None)  # two commands, so `doctor` is a subcommand
    return app, seen


OK = CheckResult(name="landlock", status="ok", detail="ABI 7")
WARN = CheckResult(name="gateway port", status="warn", detail="in use", fix="fine if up")
FAIL = CheckResult(name="podman", status="fail", detail="podman not found", fix="apt-get x")


def test_cli_json_and_exit_code_on_failure(monkeypatch) -> None:
    from typer.testing import CliRunner

    from hardware.planner import plan_serving

    host = HostSnapshot.model_validate_json((FIXTURES / "hosts" / "h100_80gb_x2.json").read_text())
    plan = plan_serving(host)
    assert plan.memory is not None and plan.tensor_parallel_size == 2
    app, seen = _cli(monkeypatch, [OK, WARN, FAIL], host)
    result = CliRunner().invoke(app, ["doctor", "--json"])
    assert result.exit_code == 6, result.output
    data = json.loads(result.stdout)
    assert data["ok"] is False
    assert [c["status"] for c in data["checks"]] == ["ok", "warn", "fail"]
    # The disk must hold every shard: per-GPU weights times the tensor-parallel size.
    assert seen[0].required_gib == pytest.approx(plan.memory.weights_gib * 2)
    assert seen[0].required_for == plan.variant


def test_cli_human_output_warnings_exit_zero(monkeypatch) -> None:
    from typer.testing import CliRunner

    app, seen = _cli(monkeypatch, [OK, WARN], CPU_HOST)
    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    assert "✓ ok" in result.stdout
    assert "! warn" in result.stdout
    assert "fix gateway port: fine if up" in result.stdout
    assert "0 failed, 1 warning" in result.stdout
    assert seen[0].required_gib is None  # embedded plan has no GPU budget: the disk floor applies


def test_default_run_turns_a_missing_binary_into_a_result(tmp_path: Path) -> None:
    proc = run_argv([str(tmp_path / "no-such-tool"), "--version"])
    assert proc.returncode == 126
