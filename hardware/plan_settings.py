"""The vLLM settings taken from the chosen candidate, each with the `Reason` that explains it,
the warnings a fit earns, and the `vllm serve` argv they make."""

from __future__ import annotations

import json
import math
from typing import Any

from hardware.catalog import Recipe, model_table, recipe_book
from hardware.plan_fit import MIB_PER_GIB, Device, Fit, cc_text, gib, recipe_setting
from hardware.plan_types import MemoryBudget, PlanOverrides, Reason
from hardware.secret_names import is_secret_flag


def _flag_value(value: Any) -> str:
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def context_length(fit: Fit) -> tuple[int, str]:
    settings = recipe_book().planner
    native = fit.variant.native_context
    ladder = [native] + [n for n in settings.context_ladder if n < native]
    for tokens in ladder:
        need = fit.sequence_gib(tokens)
        if need <= fit.cache_gib:
            return tokens, (
                f"largest of {ladder} with one full sequence in the cache: {tokens} x "
                f"{fit.kv_bytes_per_gpu:.0f} B/token/GPU + Mamba "
                f"{fit.mamba_gib * MIB_PER_GIB:.0f} MiB = {gib(need)} "
                f"<= cache {gib(fit.cache_gib)}"
            )
    smallest = ladder[-1]
    return smallest, f"nothing fits; the smallest of {ladder}"


def concurrency(fit: Fit, max_model_len: int) -> tuple[int, str]:
    settings = recipe_book().planner
    cap = recipe_setting(fit.recipes, "max_num_seqs_cap") or 64
    tokens = min(max_model_len, settings.concurrency_context)
    per_seq = fit.sequence_gib(tokens)
    room = max(0, math.floor(fit.cache_gib / per_seq))
    seqs = max(1, min(cap, room))
    why = (
        f"min(recipe cap {cap}, floor(cache {gib(fit.cache_gib)} / (Mamba "
        f"{fit.mamba_gib * MIB_PER_GIB:.0f} MiB + {tokens} x {fit.kv_bytes_per_gpu:.0f} B = "
        f"{per_seq * MIB_PER_GIB:.0f} MiB per sequence)) = {room}) = {seqs}"
    )
    return seqs, why


def kv_reason(fit: Fit, overridden: bool) -> Reason:
    if overridden:
        why = "operator override"
    elif fit.kv_cache_dtype == "fp8":
        why = f"{fit.variant.quantization} checkpoint: fp8 KV cache halves the attention cache"
    else:
        why = f"{fit.variant.quantization} checkpoint: KV cache keeps the model's dtype"
    source = "override" if overridden else "planner"
    return Reason(setting="--kv-cache-dtype", value=fit.kv_cache_dtype, why=why, source=source)


def model_reason(fit: Fit, device: Device) -> Reason:
    v = fit.variant
    order = " > ".join(
        dict.fromkeys(m.family_name for m in sorted(model_table(), key=lambda m: m.tier))
    )
    if fit.native:
        how = f"{v.quantization} runs natively on cc {cc_text(device.cc)}"
    elif v.quantization == "nvfp4":
        how = (
            f"emulated: NVFP4 runs through Marlin W4A16 on cc {cc_text(device.cc)}, "
            "slower than Blackwell's native FP4 kernels"
        )
    else:
        how = (
            f"emulated: {v.quantization} runs weight-only (Marlin) on cc "
            f"{cc_text(device.cc)}, slower"
        )
    why = f"{v.family_name} {v.quantization}: first fit in preference order ({order}); {how}"
    return Reason(setting="model", value=v.hf_id, why=why)


def tp_reason(fit: Fit) -> Reason:
    if fit.tp == 1:
        why = "fits one GPU"
    else:
        why = (
            f"smallest power of two that fits: {fit.variant.weights_gib:.2f} / {fit.tp} = "
            f"{gib(fit.weights_gib)} of weights per GPU"
        )
    return Reason(setting="--tensor-parallel-size", value=str(fit.tp), why=why)


def memory_budget(fit: Fit, device: Device) -> MemoryBudget:
    return MemoryBudget(
        device_total_gib=round(device.total_gib, 2),
        device_free_gib=round(device.free_gib, 2),
        utilization=fit.utilization,
        budget_gib=round(fit.budget_gib, 2),
        weights_gib=round(fit.weights_gib, 2),
        overhead_gib=round(fit.variant.overhead_gib, 2),
        cache_gib=round(fit.cache_gib, 2),
    )


def memory_reason(fit: Fit, device: Device) -> Reason:
    why = (
        f"budget {fit.utilization:.2f} x {gib(device.total_gib)} = {gib(fit.budget_gib)} - "
        f"weights {gib(fit.weights_gib)} - overhead {gib(fit.variant.overhead_gib)} = "
        f"{gib(fit.cache_gib)} per GPU for the KV cache and Mamba state"
    )
    return Reason(setting="memory", value=f"cache {gib(fit.cache_gib)}", why=why)


def device_reason(device: Device) -> Reason:
    why = (
        f"cc {cc_text(device.cc)} ({device.architecture or 'unknown architecture'}); per GPU "
        f"{gib(device.total_gib)} total, {gib(device.free_gib)} free ({device.memory_note})"
    )
    return Reason(setting="device", value=f"{device.count} x {device.name}", why=why)


def recipe_reasons(recipes: tuple[Recipe, ...]) -> list[Reason]:
    reasons = []
    for recipe in recipes:
        parts = [recipe.description]
        if recipe.flags:
            parts.append("flags " + " ".join(recipe.flags))
        if recipe.env:
            parts.append("env " + " ".join(f"{k}={v}" for k, v in recipe.env.items()))
        parts.append(f"source: {recipe.source}")
        reasons.append(
            Reason(setting="recipe", value=recipe.id, why="; ".join(parts), source="recipe")
        )
    return reasons


def merged_recipe_flags(recipes: tuple[Recipe, ...]) -> tuple[dict[str, Any], dict[str, str]]:
    flags: dict[str, Any] = {}
    env: dict[str, str] = {}
    for recipe in recipes:
        for flag, value in recipe.flags.items():
            flags.pop(flag, None)  # a later recipe's flag moves to its place in the order
            if value is not None:
                flags[flag] = value
        env.update(recipe.env)
    return flags, env


def clean_extra_args(args: list[str]) -> tuple[list[str], list[str]]:
    """Drop secret-bearing flags (and their values): argv is visible to every local user. The
    backend refuses the same flags (one rule: hardware/secret_names.py)."""
    kept: list[str] = []
    dropped: list[str] = []
    skip_value = False
    for arg in args:
        if skip_value:
            skip_value = False
            if not arg.startswith("-"):
                continue
        if is_secret_flag(arg):
            dropped.append(arg.split("=", 1)[0])
            skip_value = "=" not in arg
            continue
        kept.append(arg)
    return kept, dropped


def vllm_argv(
    model: str, host_addr: str, port: int, served_model_name: str, flags: dict[str, Any]
) -> list[str]:
    argv = ["vllm", "serve", model, "--host", host_addr, "--port", str(port)]
    argv += ["--served-model-name", served_model_name]
    for flag, value in flags.items():
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, _flag_value(value)]
    return argv


def fit_warnings(fit: Fit, device: Device) -> list[str]:
    settings = recipe_book().planner
    warnings = []
    kind = "unified" if device.unified else "discrete"
    floor = settings.utilization_floor[kind]
    if floor is not None and fit.utilization < floor:
        warnings.append(
            f"gpu_memory_utilization {fit.utilization:.2f} is below the {floor:.2f} floor for "
            f"{kind} memory: free memory for the model by stopping other programs"
        )
    if fit.utilization * device.total_gib > device.free_gib:
        warnings.append(
            f"gpu_memory_utilization {fit.utilization:.2f} x {gib(device.total_gib)} = "
            f"{gib(fit.utilization * device.total_gib)} exceeds the {gib(device.free_gib)} free: "
            "vLLM will refuse to start"
        )
    if fit.tp > device.count:
        warnings.append(
            f"tensor_parallel_size {fit.tp} needs {fit.tp} GPUs, this host has {device.count}: "
            "vLLM will fail to start"
        )
    if not fit.fits:
        warnings.append(
            f"{fit.variant.id} at TP{fit.tp} does not fit: needs {gib(fit.need_gib)} per GPU, "
            f"budget {gib(fit.budget_gib)}; expect vLLM to fail at start"
        )
    elif fit.cache_gib < settings.tight_cache_gib:
        warnings.append(
            f"tight fit: {gib(fit.cache_gib)} left per GPU for the KV cache and Mamba state after "
            f"weights and overhead; expect short context and little concurrency"
        )
    return warnings


def limit_settings(fit: Fit, overrides: PlanOverrides) -> tuple[int, int, list[Reason], list[str]]:
    """--max-model-len and --max-num-seqs, computed or overridden, with their reasons."""
    reasons: list[Reason] = []
    warnings: list[str] = []
    native = fit.variant.native_context
    max_model_len, why = context_length(fit)
    if overrides.max_model_len is not None:
        max_model_len = overrides.max_model_len
        reasons.append(
            Reason(
                setting="--max-model-len",
                value=str(max_model_len),
                why="operator override",
                source="override",
            )
        )
        if fit.sequence_gib(max_model_len) > fit.cache_gib:
            warnings.append(
                f"max_model_len {max_model_len}: one sequence needs "
                f"{gib(fit.sequence_gib(max_model_len))}, cache has {gib(fit.cache_gib)}"
            )
        if max_model_len > native:
            warnings.append(
                f"max_model_len {max_model_len} exceeds the native context {native}: "
                "vLLM needs VLLM_ALLOW_LONG_MAX_MODEL_LEN=1"
            )
    else:
        reasons.append(Reason(setting="--max-model-len", value=str(max_model_len), why=why))
        if max_model_len < native:
            warnings.append(
                f"context reduced to {max_model_len} tokens (native {native}) to fit the cache"
            )
    max_num_seqs, why = concurrency(fit, max_model_len)
    if overrides.max_num_seqs is not None:
        if overrides.max_num_seqs > max_num_seqs:
            warnings.append(
                f"max_num_seqs {overrides.max_num_seqs} exceeds the {max_num_seqs} that fit "
                "the cache: vLLM will preempt"
            )
        max_num_seqs = overrides.max_num_seqs
        reasons.append(
            Reason(
                setting="--max-num-seqs",
                value=str(max_num_seqs),
                why="operator override",
                source="override",
            )
        )
    else:
        reasons.append(Reason(setting="--max-num-seqs", value=str(max_num_seqs), why=why))
    return max_model_len, max_num_seqs, reasons, warnings


def override_reasons(fit: Fit, overrides: PlanOverrides) -> list[Reason]:
    reasons = []
    if overrides.tensor_parallel_size is not None:
        reasons.append(
            Reason(
                setting="--tensor-parallel-size",
                value=str(fit.tp),
                why="operator override",
                source="override",
            )
        )
    if overrides.gpu_memory_utilization is not None:
        reasons.append(
            Reason(
                setting="--gpu-memory-utilization",
                value=f"{fit.utilization:.2f}",
                why="operator override",
                source="override",
            )
        )
    return reasons
