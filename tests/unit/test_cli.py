"""The CLI through typer's runner (happy paths, JSON shape) and through main() (errors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from appliance.cli.main import app, main
from tests.conftest import FIXTURES

runner = CliRunner()
H100X2 = FIXTURES / "hosts" / "h100_80gb_x2.json"


def invoke_json(*args: str) -> dict:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_hardware_json_on_this_machine() -> None:
    host = invoke_json("hardware")
    assert host["host_class"] in {"cpu_only", "rtx", "datacenter", "dgx_spark"}
    assert host["memory_total_mib"] > 0 and host["cpu_count"] >= 1
    if host["host_class"] == "cpu_only":
        assert host["gpus"] == [] and host["nvml_error"]


def test_plan_for_recorded_host_is_stable() -> None:
    first = runner.invoke(app, ["plan", "--host-snapshot", str(H100X2), "--json"]).stdout
    second = runner.invoke(app, ["plan", "--host-snapshot", str(H100X2), "--json"]).stdout
    assert first == second
    plan = json.loads(first)
    assert plan["variant"] == "super-fp8" and plan["tensor_parallel_size"] == 2
    assert plan["argv"][:2] == ["vllm", "serve"]


def test_plan_human_output_shows_argv_and_reasons() -> None:
    result = runner.invoke(app, ["plan", "--host-snapshot", str(H100X2)])
    assert result.exit_code == 0, result.output
    assert "vllm serve nvidia/" in result.stdout
    assert "--tensor-parallel-size 2" in result.stdout


def test_plan_flag_override_wins_and_is_marked() -> None:
    plan = invoke_json("plan", "--host-snapshot", str(H100X2), "--gpu-memory-utilization", "0.5")
    assert plan["gpu_memory_utilization"] == 0.5
    overridden = [r for r in plan["reasons"] if r["source"] == "override"]
    assert [r["setting"] for r in overridden] == ["--gpu-memory-utilization"]


def test_config_override_reaches_the_plan(tmp_path: Path) -> None:
    cfg = tmp_path / "xdg" / "appliance" / "appliance.yaml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text("inference:\n  vllm:\n    max_num_seqs: 3\n")
    plan = invoke_json("plan", "--host-snapshot", str(H100X2))
    assert plan["max_num_seqs"] == 3


def test_status_before_up() -> None:
    report = invoke_json("status")
    assert set(report) >= {"appliance", "host", "gpus", "inference", "gateway"}
    assert report["appliance"]["initialised"] is False
    assert report["inference"]["plan"] is None
    assert report["gateway"]["url"] == "http://127.0.0.1:8080/v1"


def test_status_human_screen() -> None:
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 0, result.output
    assert "appliance status" in result.stdout
    assert "inference" in result.stdout and "gateway" in result.stdout


def test_doctor_json_lists_checks() -> None:
    result = runner.invoke(app, ["doctor", "--json"])
    assert result.exit_code in (0, 6), result.output
    report = json.loads(result.stdout)
    assert report["ok"] is (result.exit_code == 0)
    assert {c["status"] for c in report["checks"]} <= {"ok", "warn", "fail", "skip"}


def test_config_show_json() -> None:
    config = invoke_json("config", "show")
    assert (config["gateway"]["host"], config["gateway"]["port"]) == ("127.0.0.1", 8080)


def test_config_error_is_one_line_with_hint(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "etc" / "appliance.yaml"
    bad.parent.mkdir()
    bad.write_text("gateway:\n  port: 99999\n")
    assert main(["status", "--json"]) == 3
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"appliance: error: {bad}:2: gateway.port: ")
    assert err[1].startswith("  hint: ")
    assert len(err) == 2


def test_debug_shows_the_traceback(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "appliance.yaml").write_text("gateway: [\n")
    monkeypatch.setenv("APPLIANCE_DEBUG", "1")
    from appliance.errors import ConfigError

    with pytest.raises(ConfigError):
        main(["status"])


def test_missing_snapshot_file_is_a_usage_error(capsys) -> None:
    assert main(["plan", "--host-snapshot", "/nonexistent.json"]) == 2


def test_invalid_snapshot_names_the_file(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "snap.json"
    bad.write_text('{"host_class": "mainframe"}')
    assert main(["plan", "--host-snapshot", str(bad)]) == 3
    assert capsys.readouterr().err.startswith(f"appliance: error: {bad}: ")
