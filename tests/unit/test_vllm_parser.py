"""Every planned vLLM argv, checked by vLLM's own argument parser (opt-in tier: `-m vllm`).

Skipped unless `import vllm` works. vLLM's PyPI wheel is CUDA-only, but its parser builds on a CPU
machine with VLLM_TARGET_DEVICE=cpu (DESIGN.md: torch CPU wheel + `pip install --no-deps vllm` +
its light imports). Building the parser takes ~10 s, so it is built once per module.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from hardware.plan_types import ServingPlan
from inference.backends.vllm import set_flag, step_down_sequence

pytestmark = pytest.mark.vllm

TESTS = Path(__file__).resolve().parents[1]
PLANS = {
    p.stem: ServingPlan.model_validate_json(p.read_text())
    for p in sorted((TESTS / "golden" / "plans").glob("*.json"))
}
VLLM_PLANS = sorted(name for name, plan in PLANS.items() if plan.backend == "vllm")
ARGV_LINES = sorted(p.stem for p in (TESTS / "golden" / "argv").glob("*.txt"))


@pytest.fixture(scope="module")
def parser() -> Iterator[argparse.ArgumentParser]:
    saved = os.environ.get("VLLM_TARGET_DEVICE")
    os.environ["VLLM_TARGET_DEVICE"] = "cpu"  # read when vLLM's platform is resolved
    try:
        try:
            import vllm  # noqa: F401
            from vllm.entrypoints.common.cli_args import make_arg_parser
            from vllm.utils.argparse_utils import FlexibleArgumentParser
        except Exception as exc:  # ImportError, or a broken partial install
            pytest.skip(f"vllm is not importable here: {type(exc).__name__}: {exc}")
        yield make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))
    finally:
        if saved is None:
            os.environ.pop("VLLM_TARGET_DEVICE", None)
        else:
            os.environ["VLLM_TARGET_DEVICE"] = saved


def check(parser: argparse.ArgumentParser, argv: list[str], plan: ServingPlan) -> None:
    assert argv[:2] == ["vllm", "serve"]
    ns = parser.parse_args(argv[2:])
    assert ns.model_tag == plan.model
    assert ns.served_model_name == [plan.served_model_name]
    assert ns.max_model_len == plan.max_model_len
    assert ns.max_num_seqs == plan.max_num_seqs
    assert ns.tensor_parallel_size == plan.tensor_parallel_size
    assert ns.gpu_memory_utilization == pytest.approx(plan.gpu_memory_utilization)
    assert ns.kv_cache_dtype == plan.kv_cache_dtype
    assert ns.trust_remote_code is True
    assert ns.enable_auto_tool_choice is True
    assert ns.tool_call_parser and ns.reasoning_parser


@pytest.mark.parametrize("name", VLLM_PLANS)
def test_golden_plan_argv_parses(parser: argparse.ArgumentParser, name: str) -> None:
    check(parser, PLANS[name].argv, PLANS[name])


@pytest.mark.parametrize("name", ARGV_LINES)
def test_golden_launch_line_parses(parser: argparse.ArgumentParser, name: str) -> None:
    words = shlex.split((TESTS / "golden" / "argv" / f"{name}.txt").read_text())
    argv = words[words.index("vllm") :]
    check(parser, argv, PLANS[name])


def test_spark_speculative_config_is_json(parser: argparse.ArgumentParser) -> None:
    ns = parser.parse_args(PLANS["dgx_spark_gb10"].argv[2:])
    spec = ns.speculative_config
    spec = json.loads(spec) if isinstance(spec, str) else spec
    assert spec == {"method": "mtp", "num_speculative_tokens": 3}


def test_every_step_down_parses(parser: argparse.ArgumentParser) -> None:
    plan = PLANS["dgx_spark_gb10"]
    argv = plan.argv
    for step in step_down_sequence(plan.gpu_memory_utilization or 0.92, plan.max_model_len):
        argv = set_flag(argv, step.setting, step.new)
        ns = parser.parse_args(argv[2:])
        assert ns.gpu_memory_utilization == pytest.approx(step.utilization)
        assert ns.max_model_len == step.max_model_len


def test_unknown_flag_exits_2(parser: argparse.ArgumentParser) -> None:
    with pytest.raises(SystemExit) as caught:
        parser.parse_args([*PLANS["dgx_spark_gb10"].argv[2:], "--no-such-flag", "1"])
    assert caught.value.code == 2
