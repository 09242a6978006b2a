"""The planner's view of the GPUs and its candidates: which (variant, TP) fits the memory.

Memory model, per GPU, in GiB (what vLLM itself budgets):
    budget = total x utilisation
    cache  = budget - weights / TP - overhead    (the attention KV cache + the Mamba state)
    one sequence of L tokens = L x KV bytes/token/GPU + Mamba state/GPU
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

from hardware.catalog import ModelVariant, Recipe, RecipeMatch, model_table, recipe_book
from hardware.plan_types import PlanOverrides, Reason
from hardware.snapshot import HostSnapshot

MIB_PER_GIB = 1024
BYTES_PER_GIB = 1024**3

# --kv-cache-dtype values -> the element kind whose size the KV table is keyed by.
_KV_ELEMENT = {
    "fp8": "fp8",
    "fp8_e4m3": "fp8",
    "fp8_e5m2": "fp8",
    "fp8_inc": "fp8",
    "auto": "bf16",  # Nemotron checkpoints keep attention in bf16
    "bfloat16": "bf16",
    "float16": "bf16",
    "half": "bf16",
    "float32": "fp32",
    "float": "fp32",
}
_ELEMENT_BYTES = {"fp8": 1, "bf16": 2, "fp32": 4}


def _cc(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    major, minor = text.split(".")
    return int(major), int(minor)


def cc_text(cc: tuple[int, int] | None) -> str:
    return f"{cc[0]}.{cc[1]}" if cc else "unknown"


def _floor2(x: float) -> float:
    # The epsilon keeps 0.92 from becoming 0.91 through binary rounding.
    return math.floor(x * 100 + 1e-9) / 100


def gib(x: float) -> str:
    return f"{x:.2f} GiB"


def _kv_bytes_per_token(variant: ModelVariant, kv_dtype: str) -> float:
    """KV bytes per token, all attention layers, for this --kv-cache-dtype."""
    element = _KV_ELEMENT.get(kv_dtype, "bf16")
    table = variant.kv_bytes_per_token
    if element in table:
        return float(table[element])
    known, value = next(iter(table.items()))  # scale from the entry the table has
    return value * _ELEMENT_BYTES[element] / _ELEMENT_BYTES[known]


# --------------------------------------------------------------------------------------------
# What the GPUs offer
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    """The GPUs as the planner sees them: the smallest one decides, per GPU."""

    count: int
    name: str
    cc: tuple[int, int] | None
    architecture: str | None
    unified: bool
    total_gib: float
    free_gib: float
    memory_note: str


def device_view(host: HostSnapshot) -> Device | str:
    """The per-GPU view, or why there is none."""
    gpus = host.gpus
    ccs = [g.cc_tuple for g in gpus]
    cc = None if None in ccs else min(c for c in ccs if c is not None)
    names = sorted({g.name for g in gpus})
    common = {
        "count": len(gpus),
        "name": " + ".join(names),
        "cc": cc,
        "architecture": gpus[0].architecture,
    }
    if any(g.unified_memory for g in gpus):
        # GB10: NVML has no memory figures; vLLM takes free memory from MemAvailable.
        return Device(
            **common,
            unified=True,
            total_gib=host.memory_total_mib / MIB_PER_GIB,
            free_gib=host.memory_available_mib / MIB_PER_GIB,
            memory_note="unified memory: MemTotal / MemAvailable from /proc/meminfo",
        )
    totals, frees = [], []
    for g in gpus:
        if g.memory_total_mib is None:
            return f"GPU {g.index} ({g.name}) reports no memory size"
        free = g.memory_free_mib
        if free is None:
            free = g.memory_total_mib - (g.memory_used_mib or 0)
        totals.append(g.memory_total_mib)
        frees.append(free)
    return Device(
        **common,
        unified=False,
        total_gib=min(totals) / MIB_PER_GIB,
        free_gib=min(frees) / MIB_PER_GIB,
        memory_note="NVML memory of the smallest GPU",
    )


# --------------------------------------------------------------------------------------------
# Candidates
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fit:
    """One (variant, tensor parallel size) evaluated against the device."""

    variant: ModelVariant
    tp: int
    native: bool
    recipes: tuple[Recipe, ...]
    utilization: float
    utilization_why: str
    budget_gib: float
    weights_gib: float  # per GPU
    kv_cache_dtype: str
    kv_bytes_per_gpu: float  # per token
    mamba_gib: float  # per sequence per GPU
    need_gib: float  # weights + overhead + one sequence at the minimum useful context
    fits: bool

    @property
    def cache_gib(self) -> float:
        return self.budget_gib - self.weights_gib - self.variant.overhead_gib

    def sequence_gib(self, tokens: int) -> float:
        return (tokens * self.kv_bytes_per_gpu) / BYTES_PER_GIB + self.mamba_gib


def runs(variant: ModelVariant, cc: tuple[int, int] | None) -> Literal["native", "emulated"] | None:
    if cc is None or variant.backend != "vllm":
        return None
    native, emulated = _cc(variant.native_min_cc), _cc(variant.emulated_min_cc)
    if native is not None and cc >= native:
        return "native"
    if emulated is not None and cc >= emulated:
        return "emulated"
    return None


def _matches(
    match: RecipeMatch, host: HostSnapshot, variant: ModelVariant, tp: int, native: bool
) -> bool:
    checks = (
        match.host_class is None or host.host_class in match.host_class,
        match.family is None or variant.family in match.family,
        match.variant is None or variant.id in match.variant,
        match.quantization is None or variant.quantization in match.quantization,
        match.native is None or match.native == native,
        match.min_tensor_parallel is None or tp >= match.min_tensor_parallel,
    )
    return all(checks)


def _recipes_for(
    host: HostSnapshot, variant: ModelVariant, tp: int, native: bool
) -> tuple[Recipe, ...]:
    return tuple(r for r in recipe_book().recipes if _matches(r.match, host, variant, tp, native))


def recipe_setting(recipes: tuple[Recipe, ...], name: str) -> Any:
    """The last recipe that sets a scalar wins."""
    value = None
    for recipe in recipes:
        if getattr(recipe, name) is not None:
            value = getattr(recipe, name)
    return value


def _utilization(
    recipes: tuple[Recipe, ...], device: Device, overrides: PlanOverrides
) -> tuple[float, str]:
    if overrides.gpu_memory_utilization is not None:
        return overrides.gpu_memory_utilization, "operator override"
    settings = recipe_book().planner
    default = recipe_setting(recipes, "gpu_memory_utilization") or 0.92
    headroom = settings.headroom_gib["unified" if device.unified else "discrete"]
    available = _floor2((device.free_gib - headroom) / device.total_gib)
    utilization = max(0.0, min(default, available))
    why = (
        f"min(recipe default {default:.2f}, floor((free {gib(device.free_gib)} - headroom "
        f"{gib(headroom)}) / total {gib(device.total_gib)}) = {available:.2f}) = "
        f"{utilization:.2f}; vLLM refuses to start when free < total x utilisation"
    )
    return utilization, why


def _evaluate(
    host: HostSnapshot,
    device: Device,
    variant: ModelVariant,
    tp: int,
    overrides: PlanOverrides,
) -> Fit:
    native = runs(variant, device.cc) == "native"
    recipes = _recipes_for(host, variant, tp, native)
    utilization, why = _utilization(recipes, device, overrides)
    kv_dtype = overrides.kv_cache_dtype or variant.kv_cache_dtype or "auto"
    # KV heads split across ranks until there are fewer heads than ranks, then replicate.
    kv_share = math.ceil(variant.kv_heads / tp) / variant.kv_heads
    settings = recipe_book().planner
    partial = Fit(
        variant=variant,
        tp=tp,
        native=native,
        recipes=recipes,
        utilization=utilization,
        utilization_why=why,
        budget_gib=device.total_gib * utilization,
        weights_gib=variant.weights_gib / tp,
        kv_cache_dtype=kv_dtype,
        kv_bytes_per_gpu=_kv_bytes_per_token(variant, kv_dtype) * kv_share,
        mamba_gib=variant.mamba_state_mib / tp / MIB_PER_GIB,
        need_gib=0.0,
        fits=False,
    )
    min_context = min(settings.min_useful_context, variant.native_context)
    need = partial.weights_gib + variant.overhead_gib + partial.sequence_gib(min_context)
    # An operator's TP wins even beyond the GPU count (a warning says so).
    usable = tp <= device.count or overrides.tensor_parallel_size is not None
    fits = usable and utilization > 0 and need <= partial.budget_gib
    return replace(partial, need_gib=need, fits=fits)


def _ordered_candidates(device: Device) -> list[tuple[ModelVariant, str | None]]:
    """(variant, native|emulated|None) by family tier, then native, emulated, unsupported."""
    rank = {"native": 0, "emulated": 1, None: 2}
    rows = [(v, runs(v, device.cc)) for v in model_table() if v.backend == "vllm"]
    return sorted(rows, key=lambda row: (row[0].tier, rank[row[1]]))


def _rejection(fit: Fit, device: Device, host: HostSnapshot, overrides: PlanOverrides) -> str:
    v = fit.variant
    text = (
        f"does not fit: {v.weights_gib:.2f}/{fit.tp} weights + {v.overhead_gib:.2f} overhead + "
        f"one {recipe_book().planner.min_useful_context}-token sequence = {gib(fit.need_gib)} "
        f"per GPU at TP{fit.tp} > budget {gib(fit.budget_gib)}"
    )
    for tp in recipe_book().planner.tensor_parallel_sizes:
        if tp <= device.count:
            continue
        wider = _evaluate(host, device, v, tp, overrides)
        if wider.need_gib <= wider.budget_gib:
            return f"{text}; needs {tp} GPUs (TP{tp}), this host has {device.count}"
    return text


def unsupported(variant: ModelVariant, device: Device) -> str:
    emulated = f", emulated >= {variant.emulated_min_cc}" if variant.emulated_min_cc else ""
    return (
        f"no kernels for {variant.quantization} on cc {cc_text(device.cc)} "
        f"(native >= {variant.native_min_cc}{emulated})"
    )


def select_fit(
    host: HostSnapshot, device: Device, overrides: PlanOverrides
) -> tuple[Fit | None, list[Reason]]:
    """First fit in preference order, with a reason for every candidate passed over."""
    rejected: list[Reason] = []
    for variant, how in _ordered_candidates(device):
        if how is None:
            why = unsupported(variant, device)
            rejected.append(Reason(setting="candidate", value=variant.id, why=why))
            continue
        sizes = _tensor_parallel_sizes(device, overrides)
        fits = [_evaluate(host, device, variant, tp, overrides) for tp in sizes]
        chosen = next((f for f in fits if f.fits), None)
        if chosen is not None:
            return chosen, rejected
        why = _rejection(fits[-1], device, host, overrides) if fits else "no usable TP size"
        rejected.append(Reason(setting="candidate", value=variant.id, why=why))
    return None, rejected


def _tensor_parallel_sizes(device: Device, overrides: PlanOverrides) -> list[int]:
    if overrides.tensor_parallel_size is not None:
        return [overrides.tensor_parallel_size]
    return [tp for tp in recipe_book().planner.tensor_parallel_sizes if tp <= device.count]


def forced_fit(
    host: HostSnapshot, device: Device, variant: ModelVariant, overrides: PlanOverrides
) -> Fit:
    """The operator's variant: the smallest TP that fits, else the widest this host has."""
    fits = [
        _evaluate(host, device, variant, tp, overrides)
        for tp in _tensor_parallel_sizes(device, overrides)
    ]
    if not fits:  # a TP override of a size this host cannot reach is handled by the list above
        fits = [_evaluate(host, device, variant, 1, overrides)]
    return next((f for f in fits if f.fits), fits[-1])
