"""The serving planner: golden plans per host class, plus assertions that do not need the goldens.

Regenerate the goldens after a deliberate change with
    UPDATE_GOLDEN=1 pytest tests/unit/test_planner.py
and read the diff: the golden files are the spec.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from hardware.catalog import PLANNER_FLAGS, Recipe, model_table, recipe_book
from hardware.plan_types import PlanOverrides, ServingPlan
from hardware.planner import plan_serving
from hardware.snapshot import GpuInfo, HostClass, HostSnapshot
from tests.helpers import assert_golden

TESTS = Path(__file__).resolve().parents[1]
HOSTS_DIR = TESTS / "fixtures" / "hosts"
GOLDEN_DIR = TESTS / "golden" / "plans"

# The expected outcome per host class: (variant, tensor parallel size).
EXPECTED = {
    "dgx_spark_gb10": ("super-nvfp4", 1),
    "rtx_pro_6000_96gb": ("super-nvfp4", 1),
    "rtx_5090_32gb": ("nano30b-nvfp4", 1),
    "rtx_4090_24gb": ("nano30b-nvfp4", 1),
    "rtx_6000_ada_48gb": ("nano30b-fp8", 1),
    "h100_80gb_x1": ("nano30b-fp8", 1),
    "h100_80gb_x2": ("super-fp8", 2),
    "h200_141gb_x1": ("super-nvfp4", 1),
    "cpu_only": ("smollm2-135m", 1),
    "rtx_a4000_16gb": ("nano4b-bf16", 1),
}
HOSTS = sorted(EXPECTED)


def load_host(name: str) -> HostSnapshot:
    return HostSnapshot.model_validate_json((HOSTS_DIR / f"{name}.json").read_text())


def dump(plan: ServingPlan) -> str:
    data = plan.model_dump(mode="json")
    return json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def flag_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def free_and_total_mib(host: HostSnapshot) -> list[tuple[int, int]]:
    """(free, total) per GPU, the way vLLM measures it at start."""
    if any(g.unified_memory for g in host.gpus):
        return [(host.memory_available_mib, host.memory_total_mib)]
    return [(g.memory_free_mib or 0, g.memory_total_mib or 0) for g in host.gpus]


def test_every_fixture_has_an_expectation() -> None:
    assert sorted(p.stem for p in HOSTS_DIR.glob("*.json")) == HOSTS


# --------------------------------------------------------------------------------------------
# Golden plans
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", HOSTS)
def test_golden_plan(name: str) -> None:
    actual = dump(plan_serving(load_host(name)))
    assert_golden(GOLDEN_DIR / f"{name}.json", actual)


# --------------------------------------------------------------------------------------------
# Outcomes that do not depend on the goldens
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", HOSTS)
def test_variant_per_host(name: str) -> None:
    plan = plan_serving(load_host(name))
    assert (plan.variant, plan.tensor_parallel_size) == EXPECTED[name]


@pytest.mark.parametrize("name", HOSTS)
def test_utilisation_never_exceeds_free_memory(name: str) -> None:
    host = load_host(name)
    plan = plan_serving(host)
    if plan.backend == "embedded":
        assert plan.gpu_memory_utilization is None
        return
    utilization = plan.gpu_memory_utilization
    assert utilization is not None
    assert round(utilization * 100, 6).is_integer(), "rounded down to 0.01"
    for free, total in free_and_total_mib(host):
        assert utilization * total <= free


@pytest.mark.parametrize("name", HOSTS)
def test_plan_is_deterministic_and_does_not_touch_the_host(name: str) -> None:
    host = load_host(name)
    before = host.model_dump()
    assert dump(plan_serving(host)) == dump(plan_serving(host))
    assert host.model_dump() == before


@pytest.mark.parametrize("name", HOSTS)
def test_argv_shape(name: str) -> None:
    plan = plan_serving(load_host(name), served_model_name="nemo", host_addr="127.0.0.2", port=9001)
    if plan.backend == "embedded":
        assert plan.argv == []
        return
    assert plan.argv[:9] == [
        "vllm",
        "serve",
        plan.model,
        "--host",
        "127.0.0.2",
        "--port",
        "9001",
        "--served-model-name",
        "nemo",
    ]
    assert flag_value(plan.argv, "--max-model-len") == str(plan.max_model_len)
    assert flag_value(plan.argv, "--max-num-seqs") == str(plan.max_num_seqs)
    assert flag_value(plan.argv, "--kv-cache-dtype") == plan.kv_cache_dtype
    assert float(flag_value(plan.argv, "--gpu-memory-utilization")) == plan.gpu_memory_utilization
    for flag in ("--trust-remote-code", "--enable-auto-tool-choice", "--enable-prefix-caching"):
        assert flag in plan.argv
    assert flag_value(plan.argv, "--tool-call-parser") == "qwen3_coder"
    assert flag_value(plan.argv, "--reasoning-parser") == "nemotron_v3"
    assert flag_value(plan.argv, "--mamba-ssm-cache-dtype") == "float32"
    flags = [a for a in plan.argv if a.startswith("--")]
    assert len(flags) == len(set(flags)), "each flag once"


@pytest.mark.parametrize("name", HOSTS)
def test_memory_budget_adds_up(name: str) -> None:
    plan = plan_serving(load_host(name))
    if plan.memory is None:
        return
    m = plan.memory
    assert m.budget_gib == pytest.approx(m.device_total_gib * m.utilization, abs=0.02)
    assert m.cache_gib == pytest.approx(m.budget_gib - m.weights_gib - m.overhead_gib, abs=0.02)
    assert m.cache_gib > 0


def test_spark_uses_its_recipe() -> None:
    plan = plan_serving(load_host("dgx_spark_gb10"))
    argv = plan.argv
    assert json.loads(flag_value(argv, "--speculative-config")) == {
        "method": "mtp",
        "num_speculative_tokens": 3,
    }
    assert flag_value(argv, "--load-format") == "fastsafetensors"
    assert flag_value(argv, "--attention-backend") == "flashinfer"
    assert flag_value(argv, "--max-num-batched-tokens") == "16384"
    assert flag_value(argv, "--mamba-cache-mode") == "align"
    assert plan.env == {
        "VLLM_FLOAT32_MATMUL_PRECISION": "high",
        "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1",
    }
    assert plan.gpu_memory_utilization == 0.8
    assert plan.max_num_seqs <= 8
    assert any(r.source == "recipe" and r.value == "dgx-spark-super-nvfp4" for r in plan.reasons)


def test_rtx_pro_super_has_mtp_without_spark_flags() -> None:
    plan = plan_serving(load_host("rtx_pro_6000_96gb"))
    assert "--speculative-config" in plan.argv
    assert "--load-format" not in plan.argv
    assert "--attention-backend" not in plan.argv
    assert plan.gpu_memory_utilization == 0.92


def test_spark_utilisation_comes_from_memavailable() -> None:
    host = load_host("dgx_spark_gb10")
    # Other programs took memory: utilisation follows MemAvailable, not the recipe's 0.8.
    busy = host.model_copy(update={"memory_available_mib": 100 * 1024})
    plan = plan_serving(busy)
    assert plan.gpu_memory_utilization == 0.73  # floor((100 - 8) / 124.6, 2)
    assert plan.gpu_memory_utilization * busy.memory_total_mib <= busy.memory_available_mib
    assert plan.memory is not None and plan.memory.device_free_gib == 100.0
    assert not any("floor" in w for w in plan.warnings)


def test_spark_warns_below_the_uma_floor() -> None:
    busy = load_host("dgx_spark_gb10").model_copy(update={"memory_available_mib": 90 * 1024})
    plan = plan_serving(busy)
    assert plan.gpu_memory_utilization is not None and plan.gpu_memory_utilization < 0.70
    assert any("0.70 floor" in w for w in plan.warnings)


def test_two_h100_use_tensor_and_expert_parallelism() -> None:
    plan = plan_serving(load_host("h100_80gb_x2"))
    assert flag_value(plan.argv, "--tensor-parallel-size") == "2"
    assert "--enable-expert-parallel" in plan.argv
    assert plan.kv_cache_dtype == "fp8"


def test_single_gpu_plans_have_no_expert_parallelism() -> None:
    for name in HOSTS:
        plan = plan_serving(load_host(name))
        if plan.tensor_parallel_size == 1:
            assert "--enable-expert-parallel" not in plan.argv


def test_h100_explains_why_super_does_not_fit() -> None:
    plan = plan_serving(load_host("h100_80gb_x1"))
    rejected = {r.value: r.why for r in plan.reasons if r.setting == "candidate"}
    assert "does not fit" in rejected["super-nvfp4"]
    assert "needs 2 GPUs" in rejected["super-fp8"]
    assert "--async-scheduling" in plan.argv  # the Nano FP8 recipe


def test_h200_runs_super_nvfp4_emulated_and_says_fp8_needs_two() -> None:
    plan = plan_serving(load_host("h200_141gb_x1"))
    rejected = {r.value: r.why for r in plan.reasons if r.setting == "candidate"}
    assert "needs 2 GPUs" in rejected["super-fp8"]
    model = next(r for r in plan.reasons if r.setting == "model")
    assert "Marlin" in model.why and "slower" in model.why


def test_rtx_4090_is_tight_and_emulated() -> None:
    plan = plan_serving(load_host("rtx_4090_24gb"))
    assert plan.max_model_len < 262144
    assert any("tight" in w for w in plan.warnings)
    assert any("context reduced" in w for w in plan.warnings)
    model = next(r for r in plan.reasons if r.setting == "model")
    assert "Marlin" in model.why


def test_bf16_variants_get_kv_cache_dtype_auto() -> None:
    host = load_host("h200_141gb_x1")
    for variant in model_table():
        if variant.quantization == "bf16":
            plan = plan_serving(host, PlanOverrides(model=variant.id))
            assert plan.kv_cache_dtype == "auto"
            assert flag_value(plan.argv, "--kv-cache-dtype") == "auto"
        elif variant.quantization in ("fp8", "nvfp4"):
            assert variant.kv_cache_dtype == "fp8"
    assert plan_serving(load_host("rtx_a4000_16gb")).kv_cache_dtype == "auto"


def test_no_gpu_serves_the_embedded_model() -> None:
    plan = plan_serving(load_host("cpu_only"))
    assert plan.backend == "embedded"
    assert plan.model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert plan.max_model_len == 8192
    assert plan.argv == []
    backend = next(r for r in plan.reasons if r.setting == "backend")
    assert backend.why == "no NVIDIA GPU/driver: NVML Shared Library Not Found"


def test_the_embedded_plan_reports_the_context_the_server_runs() -> None:
    # The embedded server NTK-scales RoPE to inference.embedded_context: the plan says so.
    plan = plan_serving(load_host("cpu_only"), embedded_context=32768)
    assert plan.max_model_len == 32768
    reason = next(r for r in plan.reasons if r.setting == "max_model_len")
    assert "embedded_context" in reason.why
    assert plan.warnings == []
    # An explicit max_model_len override still wins, and past the native length it warns.
    forced = plan_serving(
        load_host("cpu_only"), PlanOverrides(max_model_len=16384), embedded_context=32768
    )
    assert forced.max_model_len == 16384
    assert any("native context" in w for w in forced.warnings)


def _small_gpu_host(name: str, cc: str, total_mib: int) -> HostSnapshot:
    gpu = GpuInfo(
        index=0,
        name=name,
        compute_capability=cc,
        memory_total_mib=total_mib,
        memory_used_mib=200,
        memory_free_mib=total_mib - 200,
    )
    return HostSnapshot(
        host_class=HostClass.RTX,
        cpu_count=8,
        memory_total_mib=32768,
        memory_available_mib=28000,
        gpus=[gpu],
    )


def test_a_gpu_too_small_for_any_nemotron_falls_back_to_embedded() -> None:
    plan = plan_serving(_small_gpu_host("NVIDIA GeForce GTX 1650", "7.5", 4096))
    assert plan.backend == "embedded"
    assert any("no Nemotron variant fits" in w for w in plan.warnings)


def test_a_gpu_without_kernels_falls_back_to_embedded() -> None:
    plan = plan_serving(_small_gpu_host("NVIDIA Tesla P40", "6.1", 24576))
    assert plan.backend == "embedded"
    assert any("no kernels" in r.why for r in plan.reasons if r.setting == "candidate")


# --------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------


def test_overrides_win_and_are_marked() -> None:
    overrides = PlanOverrides(
        model="nano30b-fp8",
        gpu_memory_utilization=0.7,
        max_model_len=65536,
        max_num_seqs=3,
        tensor_parallel_size=1,
        kv_cache_dtype="auto",
        extra_args=["--enforce-eager"],
    )
    plan = plan_serving(load_host("h100_80gb_x2"), overrides)
    assert plan.variant == "nano30b-fp8"
    assert plan.tensor_parallel_size == 1
    assert plan.gpu_memory_utilization == 0.7
    assert (plan.max_model_len, plan.max_num_seqs, plan.kv_cache_dtype) == (65536, 3, "auto")
    assert plan.argv[-1] == "--enforce-eager"
    assert flag_value(plan.argv, "--gpu-memory-utilization") == "0.70"
    overridden = {r.setting for r in plan.reasons if r.source == "override"}
    assert {
        "model",
        "--tensor-parallel-size",
        "--gpu-memory-utilization",
        "--max-model-len",
        "--max-num-seqs",
        "--kv-cache-dtype",
        "extra_args",
    } <= overridden
    assert "--enable-expert-parallel" not in plan.argv  # TP1 now


def test_override_utilisation_above_free_memory_is_kept_with_a_warning() -> None:
    plan = plan_serving(load_host("h100_80gb_x1"), PlanOverrides(gpu_memory_utilization=1.0))
    assert plan.gpu_memory_utilization == 1.0
    assert any("refuse to start" in w for w in plan.warnings)


def test_override_variant_that_does_not_fit_is_kept_with_a_warning() -> None:
    plan = plan_serving(load_host("h100_80gb_x1"), PlanOverrides(model="super-bf16"))
    assert plan.variant == "super-bf16"
    assert any("does not fit" in w for w in plan.warnings)


def test_override_tensor_parallel_beyond_the_gpu_count_warns() -> None:
    plan = plan_serving(load_host("h100_80gb_x1"), PlanOverrides(tensor_parallel_size=2))
    assert plan.tensor_parallel_size == 2
    assert any("needs 2 GPUs" in w for w in plan.warnings)


def test_override_with_an_unknown_hf_id_keeps_the_planned_settings() -> None:
    host = load_host("rtx_5090_32gb")
    planned = plan_serving(host)
    plan = plan_serving(host, PlanOverrides(model="my-org/nemotron-nano-finetune"))
    assert plan.argv[2] == plan.model == "my-org/nemotron-nano-finetune"
    assert plan.variant == planned.variant
    assert plan.max_model_len == planned.max_model_len
    assert any(r.source == "override" and r.setting == "model" for r in plan.reasons)


def test_override_with_a_known_hf_id_selects_that_variant() -> None:
    plan = plan_serving(
        load_host("h200_141gb_x1"), PlanOverrides(model="nvidia/NVIDIA-Nemotron-3-Nano-4B-FP8")
    )
    assert plan.variant == "nano4b-fp8"


def test_cpu_only_with_a_gpu_variant_override_warns() -> None:
    plan = plan_serving(load_host("cpu_only"), PlanOverrides(model="super-nvfp4"))
    assert plan.backend == "embedded"
    assert any("needs an NVIDIA GPU" in w for w in plan.warnings)


@pytest.mark.parametrize("name", HOSTS)
def test_argv_never_carries_secrets(name: str) -> None:
    extra = ["--api-key", "sk-secret", "--hf-token=hf_abc", "--max-num-batched-tokens", "8192"]
    plan = plan_serving(load_host(name), PlanOverrides(extra_args=extra))
    text = " ".join(plan.argv)
    for secret in ("sk-secret", "hf_abc", "--api-key", "--hf-token"):
        assert secret not in text
    if plan.backend == "vllm":
        assert plan.argv[-2:] == ["--max-num-batched-tokens", "8192"]  # appended: last one wins
        assert any("dropped --api-key" in w for w in plan.warnings)
    for arg in plan_serving(load_host(name)).argv:
        name_part = arg.split("=", 1)[0].lower()
        assert not any(word in name_part for word in ("api-key", "secret", "password"))
        assert not name_part.endswith(("-token", "_token"))


# --------------------------------------------------------------------------------------------
# The tables
# --------------------------------------------------------------------------------------------


def test_kv_bytes_match_the_architecture() -> None:
    for v in model_table():
        if v.backend != "vllm":
            continue
        per_element = v.attention_layers * v.kv_heads * v.head_dim * 2  # K and V
        assert v.kv_bytes_per_token == {"fp8": per_element, "bf16": 2 * per_element}, v.id


def test_every_number_has_a_source() -> None:
    for v in model_table():
        for key in ("weights_gib", "native_context", "kv_bytes_per_token", "mamba_state_mib"):
            assert key in v.source, f"{v.id}: no source for {key}"
        assert "overhead_gib" in v.source, v.id


def test_recipes_name_known_variants_and_families() -> None:
    variants = {v.id for v in model_table()}
    families = {v.family for v in model_table()}
    for recipe in recipe_book().recipes:
        assert set(recipe.match.variant or []) <= variants, recipe.id
        assert set(recipe.match.family or []) <= families, recipe.id


def test_recipes_cannot_set_planner_flags() -> None:
    for flag in PLANNER_FLAGS:
        with pytest.raises(ValidationError):
            Recipe.model_validate(
                {"id": "x", "description": "x", "source": "x", "match": {}, "flags": {flag: 1}}
            )
