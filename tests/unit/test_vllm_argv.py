"""The vLLM backend's launch line (golden files), the OOM step-down ladder, and argv hygiene.

Regenerate the goldens after a deliberate change with
    UPDATE_GOLDEN=1 pytest tests/unit/test_vllm_argv.py
and read the diff: each file is the exact line the backend runs on that host.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from hardware.plan_types import PlanOverrides, ServingPlan
from hardware.planner import plan_serving
from hardware.snapshot import HostSnapshot
from inference.backends.base import secret_flags
from inference.backends.process import ProcessBackend
from inference.backends.vllm import (
    StepLimits,
    VllmBackend,
    diagnose_oom,
    flag_value,
    next_step_down,
    set_flag,
    step_down_sequence,
)
from tests.helpers import UPDATE_GOLDEN, assert_golden

TESTS = Path(__file__).resolve().parents[1]
HOSTS_DIR = TESTS / "fixtures" / "hosts"
GOLDEN_DIR = TESTS / "golden" / "argv"


def load_plan(name: str, overrides: PlanOverrides | None = None) -> ServingPlan:
    host = HostSnapshot.model_validate_json((HOSTS_DIR / f"{name}.json").read_text())
    return plan_serving(host, overrides)


VLLM_HOSTS = sorted(p.stem for p in HOSTS_DIR.glob("*.json") if load_plan(p.stem).backend == "vllm")


def backend(plan: ServingPlan, tmp_path: Path, **kwargs: object) -> VllmBackend:
    return VllmBackend(plan, log_path=tmp_path / "vllm.log", **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Golden launch lines
# --------------------------------------------------------------------------------------------


def test_every_vllm_host_has_a_golden_and_no_golden_is_stale() -> None:
    assert len(VLLM_HOSTS) >= 9  # every recorded GPU host plans vLLM; cpu_only does not
    assert "cpu_only" not in VLLM_HOSTS
    if not UPDATE_GOLDEN:
        assert sorted(p.stem for p in GOLDEN_DIR.glob("*.txt")) == VLLM_HOSTS


@pytest.mark.parametrize("name", VLLM_HOSTS)
def test_golden_launch_line(name: str, tmp_path: Path) -> None:
    plan = load_plan(name)
    line = backend(plan, tmp_path).command_line() + "\n"
    assert_golden(GOLDEN_DIR / f"{name}.txt", line)


@pytest.mark.parametrize("name", VLLM_HOSTS)
def test_launch_line_is_the_plan(name: str, tmp_path: Path) -> None:
    """The golden line round-trips through the shell to exactly the plan's argv and env."""
    plan = load_plan(name)
    words = shlex.split(backend(plan, tmp_path).command_line())
    env = dict(w.split("=", 1) for w in words[: words.index("vllm")])
    assert words[words.index("vllm") :] == plan.argv
    assert {k: env[k] for k in plan.env} == plan.env
    assert env["VLLM_NO_USAGE_STATS"] == "1" and env["DO_NOT_TRACK"] == "1"
    assert "HF_HUB_OFFLINE" not in env
    assert secret_flags(plan.argv) == []
    assert flag_value(plan.argv, "--host") == "127.0.0.1"


def test_executable_is_replaceable_and_base_url_follows_the_plan(tmp_path: Path) -> None:
    host = HostSnapshot.model_validate_json((HOSTS_DIR / "dgx_spark_gb10.json").read_text())
    plan = plan_serving(host, port=18123, served_model_name="local")
    b = backend(plan, tmp_path, executable=["/usr/bin/python3", "-m", "tests.fakes.fake_vllm"])
    assert b.argv[:4] == ["/usr/bin/python3", "-m", "tests.fakes.fake_vllm", "serve"]
    assert b.argv[4:] == plan.argv[2:]
    assert b.base_url == "http://127.0.0.1:18123"
    assert b.api_base == "http://127.0.0.1:18123/v1"
    assert b.served_model_name == "local"
    assert b.model == plan.model


def test_offline_and_local_model(tmp_path: Path) -> None:
    plan = load_plan("rtx_4090_24gb")
    model_dir = tmp_path / "weights"
    b = backend(plan, tmp_path, offline=True, model_path=model_dir, hf_home=tmp_path / "hf")
    assert b.env["HF_HUB_OFFLINE"] == "1"
    assert b.env["HF_HOME"] == str(tmp_path / "hf")
    assert b.model == str(model_dir)
    assert b.argv[2] == str(model_dir)
    assert b.plan.argv[2] == plan.model  # the plan still names the model it chose


def test_refuses_an_embedded_plan(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a vLLM plan"):
        backend(load_plan("cpu_only"), tmp_path)


# --------------------------------------------------------------------------------------------
# Secrets never in argv
# --------------------------------------------------------------------------------------------


def test_api_key_goes_to_env_never_to_argv(tmp_path: Path) -> None:
    b = backend(load_plan("h100_80gb_x1"), tmp_path, api_key="sk-very-secret")
    assert not any("sk-very-secret" in a for a in b.argv)
    assert "sk-very-secret" not in b.command_line()
    assert "VLLM_API_KEY=***" in b.command_line()
    assert "sk-very-secret" not in repr(b)
    assert b.env["VLLM_API_KEY"] == "sk-very-secret"
    assert b.auth_headers() == {"Authorization": "Bearer sk-very-secret"}


@pytest.mark.parametrize(
    "argv",
    [
        ["vllm", "serve", "m", "--api-key", "x"],
        ["vllm", "serve", "m", "--api-key=x"],
        ["vllm", "serve", "m", "--hf-token", "x"],
    ],
)
def test_process_backend_refuses_secret_flags(argv: list[str], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="secrets never go in argv"):
        ProcessBackend(argv, base_url="http://127.0.0.1:1", log_path=tmp_path / "log")


def test_token_counts_are_not_secrets() -> None:
    assert secret_flags(["--max-num-batched-tokens", "16384"]) == []


def test_secret_extra_args_never_reach_the_backend(tmp_path: Path) -> None:
    plan = load_plan("h100_80gb_x1", PlanOverrides(extra_args=["--api-key", "s3cret", "--seed=1"]))
    b = backend(plan, tmp_path)
    assert "s3cret" not in b.command_line()
    assert b.argv[-1] == "--seed=1"


# --------------------------------------------------------------------------------------------
# OOM step-down, computed purely
# --------------------------------------------------------------------------------------------


def test_step_down_sequence_from_the_vllm_default() -> None:
    steps = step_down_sequence(0.92, 262144)
    assert [(s.setting, s.new) for s in steps] == [
        ("--gpu-memory-utilization", "0.87"),
        ("--gpu-memory-utilization", "0.82"),
        ("--gpu-memory-utilization", "0.77"),
        ("--gpu-memory-utilization", "0.72"),
        ("--gpu-memory-utilization", "0.70"),
        ("--max-model-len", "131072"),
        ("--max-model-len", "65536"),
        ("--max-model-len", "32768"),
    ]
    assert steps[-1].utilization == 0.70 and steps[-1].max_model_len == 32768


def test_step_down_from_the_spark_plan() -> None:
    plan = load_plan("dgx_spark_gb10")
    assert plan.gpu_memory_utilization is not None
    steps = step_down_sequence(plan.gpu_memory_utilization, plan.max_model_len)
    assert [s.new for s in steps] == ["0.75", "0.70", "131072", "65536", "32768"]


def test_nothing_to_step_at_the_floors() -> None:
    assert next_step_down(0.70, 32768) is None
    assert step_down_sequence(0.60, 16384) == []


def test_below_the_utilisation_floor_only_context_steps() -> None:
    assert [s.new for s in step_down_sequence(0.65, 131072)] == ["65536", "32768"]


def test_context_oom_skips_utilisation_and_jumps_to_the_estimate() -> None:
    step = next_step_down(0.80, 262144, "context", estimate=70000)
    assert step is not None
    assert (step.setting, step.utilization, step.max_model_len) == ("--max-model-len", 0.80, 65536)
    assert next_step_down(0.80, 262144, "context", estimate=20000) is None  # below the floor


def test_custom_limits() -> None:
    limits = StepLimits(min_utilization=0.80, utilization_step=0.1, min_max_model_len=65536)
    assert [s.new for s in step_down_sequence(0.95, 131072, limits)] == ["0.85", "0.80", "65536"]


def test_set_flag_replaces_every_form_or_appends() -> None:
    argv = ["vllm", "serve", "m", "--max-model-len", "8", "--x", "--max-model-len=9"]
    assert set_flag(argv, "--max-model-len", "4") == [
        "vllm", "serve", "m", "--max-model-len", "4", "--x", "--max-model-len=4",
    ]  # fmt: skip
    assert flag_value(argv, "--max-model-len") == "9"  # the last occurrence wins
    assert set_flag(["vllm"], "--gpu-memory-utilization", "0.7")[-2:] == [
        "--gpu-memory-utilization",
        "0.7",
    ]


# Messages as vLLM prints them (v1 engine, 0.2x-0.33), followed by the wrapper error it ends with.
OOM_LOGS = {
    "memory": [
        "ValueError: Free memory on device cuda:0 (101.75/119.70 GiB) on startup is less than "
        "desired GPU memory utilization (0.9, 107.73 GiB). Decrease GPU memory utilization or "
        "reduce GPU memory used by other processes.",
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a "
        "total capacity of 79.19 GiB of which 1.12 GiB is free.",
        "ValueError: No available memory for the cache blocks. Try increasing "
        "`gpu_memory_utilization` when initializing the engine.",
    ],
    "context": [
        "ValueError: To serve at least one request with the models's max seq len (262144), "
        "(16.00 GiB KV cache is needed, which is larger than the available KV cache memory "
        "(4.10 GiB). Based on the available memory, the estimated maximum model length is "
        "67120. Try increasing `gpu_memory_utilization` or decreasing `max_model_len` when "
        "initializing the engine.",
    ],
}


@pytest.mark.parametrize(
    ("kind", "line"), [(k, line) for k, lines in OOM_LOGS.items() for line in lines]
)
def test_diagnose_oom(kind: str, line: str) -> None:
    log = f"INFO loading\r50%\n{line}\nRuntimeError: Engine core initialization failed.\n"
    oom = diagnose_oom(log)
    assert oom is not None and oom.kind == kind and oom.message == line
    if kind == "context":
        assert oom.estimate == 67120


def test_other_failures_are_not_oom() -> None:
    assert (
        diagnose_oom("OSError: nvidia/foo is not a local folder and is not a valid model") is None
    )
    assert diagnose_oom("") is None
