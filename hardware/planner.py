"""The serving planner: host facts in, a serving plan out.

`plan_serving` is a pure function of a `HostSnapshot` and the operator's `PlanOverrides`. Its only
input besides those is the packaged tables `hardware/data/models.yaml` (which models exist, how
big they are, what their cache costs) and `hardware/data/recipes.yaml` (the vLLM flags per recipe
and the planner's tunables). Which model and which recipe apply is decided by those tables; the
code only does the arithmetic and explains each step as a `Reason`.

Memory model, per GPU, in GiB (what vLLM itself budgets):
    budget = total x utilisation
    cache  = budget - weights / TP - overhead    (the attention KV cache + the Mamba state)
    one sequence of L tokens = L x KV bytes/token/GPU + Mamba state/GPU
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any, Literal

from hardware.catalog import (
    ModelVariant,
    Recipe,
    RecipeMatch,
    embedded_variant,
    model_table,
    recipe_book,
    variant_by_id,
)
from hardware.plan_types import MemoryBudget, PlanOverrides, Reason, ServingPlan
from hardware.snapshot import HostSnapshot

MIB_PER_GIB = 1024
BYTES_PER_GIB = 1024**3
BYTES_PER_MIB = 1024**2

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


def _cc_text(cc: tuple[int, int] | None) -> str:
    return f"{cc[0]}.{cc[1]}" if cc else "unknown"


def _floor2(x: float) -> float:
    # The epsilon keeps 0.92 from becoming 0.91 through binary rounding.
    return math.floor(x * 100 + 1e-9) / 100


def _gib(x: float) -> str:
    return f"{x:.2f} GiB"


def _kv_bytes_per_token(variant: ModelVariant, kv_dtype: str) -> float:
    """KV bytes per token, all attention layers, for this --kv-cache-dtype."""
    element = _KV_ELEMENT.get(kv_dtype, "bf16")
    table = variant.kv_bytes_per_token
    if element in table:
        return float(table[element])
    known, value = next(iter(table.items()))  # scale from the entry the table has
    return value * _ELEMENT_BYTES[element] / _ELEMENT_BYTES[known]


def _flag_value(value: Any) -> str:
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _is_secret_flag(arg: str) -> bool:
    name = arg.split("=", 1)[0].lower()
    if not name.startswith("-"):
        return False
    if any(word in name for word in ("api-key", "api_key", "apikey", "secret", "password")):
        return True
    return name in ("--token", "-token") or name.endswith(("-token", "_token"))


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


def _device(host: HostSnapshot) -> Device | str:
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


def _runs(
    variant: ModelVariant, cc: tuple[int, int] | None
) -> Literal["native", "emulated"] | None:
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


def _recipe_setting(recipes: tuple[Recipe, ...], name: str) -> Any:
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
    default = _recipe_setting(recipes, "gpu_memory_utilization") or 0.92
    headroom = settings.headroom_gib["unified" if device.unified else "discrete"]
    available = _floor2((device.free_gib - headroom) / device.total_gib)
    utilization = max(0.0, min(default, available))
    why = (
        f"min(recipe default {default:.2f}, floor((free {_gib(device.free_gib)} - headroom "
        f"{_gib(headroom)}) / total {_gib(device.total_gib)}) = {available:.2f}) = "
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
    native = _runs(variant, device.cc) == "native"
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
    rows = [(v, _runs(v, device.cc)) for v in model_table() if v.backend == "vllm"]
    return sorted(rows, key=lambda row: (row[0].tier, rank[row[1]]))


def _rejection(fit: Fit, device: Device, host: HostSnapshot, overrides: PlanOverrides) -> str:
    v = fit.variant
    text = (
        f"does not fit: {v.weights_gib:.2f}/{fit.tp} weights + {v.overhead_gib:.2f} overhead + "
        f"one {recipe_book().planner.min_useful_context}-token sequence = {_gib(fit.need_gib)} "
        f"per GPU at TP{fit.tp} > budget {_gib(fit.budget_gib)}"
    )
    for tp in recipe_book().planner.tensor_parallel_sizes:
        if tp <= device.count:
            continue
        wider = _evaluate(host, device, v, tp, overrides)
        if wider.need_gib <= wider.budget_gib:
            return f"{text}; needs {tp} GPUs (TP{tp}), this host has {device.count}"
    return text


def _unsupported(variant: ModelVariant, device: Device) -> str:
    emulated = f", emulated >= {variant.emulated_min_cc}" if variant.emulated_min_cc else ""
    return (
        f"no kernels for {variant.quantization} on cc {_cc_text(device.cc)} "
        f"(native >= {variant.native_min_cc}{emulated})"
    )


def _select(
    host: HostSnapshot, device: Device, overrides: PlanOverrides
) -> tuple[Fit | None, list[Reason]]:
    """First fit in preference order, with a reason for every candidate passed over."""
    rejected: list[Reason] = []
    for variant, how in _ordered_candidates(device):
        if how is None:
            why = _unsupported(variant, device)
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


def _forced(
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


# --------------------------------------------------------------------------------------------
# Settings from the chosen candidate
# --------------------------------------------------------------------------------------------


def _context(fit: Fit) -> tuple[int, str]:
    settings = recipe_book().planner
    native = fit.variant.native_context
    ladder = [native] + [n for n in settings.context_ladder if n < native]
    for tokens in ladder:
        need = fit.sequence_gib(tokens)
        if need <= fit.cache_gib:
            return tokens, (
                f"largest of {ladder} with one full sequence in the cache: {tokens} x "
                f"{fit.kv_bytes_per_gpu:.0f} B/token/GPU + Mamba "
                f"{fit.mamba_gib * MIB_PER_GIB:.0f} MiB = {_gib(need)} "
                f"<= cache {_gib(fit.cache_gib)}"
            )
    smallest = ladder[-1]
    return smallest, f"nothing fits; the smallest of {ladder}"


def _concurrency(fit: Fit, max_model_len: int) -> tuple[int, str]:
    settings = recipe_book().planner
    cap = _recipe_setting(fit.recipes, "max_num_seqs_cap") or 64
    tokens = min(max_model_len, settings.concurrency_context)
    per_seq = fit.sequence_gib(tokens)
    room = max(0, math.floor(fit.cache_gib / per_seq))
    seqs = max(1, min(cap, room))
    why = (
        f"min(recipe cap {cap}, floor(cache {_gib(fit.cache_gib)} / (Mamba "
        f"{fit.mamba_gib * MIB_PER_GIB:.0f} MiB + {tokens} x {fit.kv_bytes_per_gpu:.0f} B = "
        f"{per_seq * MIB_PER_GIB:.0f} MiB per sequence)) = {room}) = {seqs}"
    )
    return seqs, why


def _kv_reason(fit: Fit, overridden: bool) -> Reason:
    if overridden:
        why = "operator override"
    elif fit.kv_cache_dtype == "fp8":
        why = f"{fit.variant.quantization} checkpoint: fp8 KV cache halves the attention cache"
    else:
        why = f"{fit.variant.quantization} checkpoint: KV cache keeps the model's dtype"
    source = "override" if overridden else "planner"
    return Reason(setting="--kv-cache-dtype", value=fit.kv_cache_dtype, why=why, source=source)


def _model_reason(fit: Fit, device: Device) -> Reason:
    v = fit.variant
    order = " > ".join(
        dict.fromkeys(m.family_name for m in sorted(model_table(), key=lambda m: m.tier))
    )
    if fit.native:
        how = f"{v.quantization} runs natively on cc {_cc_text(device.cc)}"
    elif v.quantization == "nvfp4":
        how = (
            f"emulated: NVFP4 runs through Marlin W4A16 on cc {_cc_text(device.cc)}, "
            "slower than Blackwell's native FP4 kernels"
        )
    else:
        how = (
            f"emulated: {v.quantization} runs weight-only (Marlin) on cc "
            f"{_cc_text(device.cc)}, slower"
        )
    why = f"{v.family_name} {v.quantization}: first fit in preference order ({order}); {how}"
    return Reason(setting="model", value=v.hf_id, why=why)


def _tp_reason(fit: Fit) -> Reason:
    if fit.tp == 1:
        why = "fits one GPU"
    else:
        why = (
            f"smallest power of two that fits: {fit.variant.weights_gib:.2f} / {fit.tp} = "
            f"{_gib(fit.weights_gib)} of weights per GPU"
        )
    return Reason(setting="--tensor-parallel-size", value=str(fit.tp), why=why)


def _memory(fit: Fit, device: Device) -> MemoryBudget:
    return MemoryBudget(
        device_total_gib=round(device.total_gib, 2),
        device_free_gib=round(device.free_gib, 2),
        utilization=fit.utilization,
        budget_gib=round(fit.budget_gib, 2),
        weights_gib=round(fit.weights_gib, 2),
        overhead_gib=round(fit.variant.overhead_gib, 2),
        cache_gib=round(fit.cache_gib, 2),
    )


def _memory_reason(fit: Fit, device: Device) -> Reason:
    why = (
        f"budget {fit.utilization:.2f} x {_gib(device.total_gib)} = {_gib(fit.budget_gib)} - "
        f"weights {_gib(fit.weights_gib)} - overhead {_gib(fit.variant.overhead_gib)} = "
        f"{_gib(fit.cache_gib)} per GPU for the KV cache and Mamba state"
    )
    return Reason(setting="memory", value=f"cache {_gib(fit.cache_gib)}", why=why)


def _device_reason(device: Device) -> Reason:
    why = (
        f"cc {_cc_text(device.cc)} ({device.architecture or 'unknown architecture'}); per GPU "
        f"{_gib(device.total_gib)} total, {_gib(device.free_gib)} free ({device.memory_note})"
    )
    return Reason(setting="device", value=f"{device.count} x {device.name}", why=why)


def _recipe_reasons(recipes: tuple[Recipe, ...]) -> list[Reason]:
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


def _recipe_flags(recipes: tuple[Recipe, ...]) -> tuple[dict[str, Any], dict[str, str]]:
    flags: dict[str, Any] = {}
    env: dict[str, str] = {}
    for recipe in recipes:
        for flag, value in recipe.flags.items():
            flags.pop(flag, None)  # a later recipe's flag moves to its place in the order
            if value is not None:
                flags[flag] = value
        env.update(recipe.env)
    return flags, env


def _clean_extra_args(args: list[str]) -> tuple[list[str], list[str]]:
    """Drop secret-bearing flags (and their values): argv is visible to every local user."""
    kept: list[str] = []
    dropped: list[str] = []
    skip_value = False
    for arg in args:
        if skip_value:
            skip_value = False
            if not arg.startswith("-"):
                continue
        if _is_secret_flag(arg):
            dropped.append(arg.split("=", 1)[0])
            skip_value = "=" not in arg
            continue
        kept.append(arg)
    return kept, dropped


def _argv(
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


# --------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------


def _embedded_plan(
    overrides: PlanOverrides,
    served_model_name: str,
    why: str,
    reasons: list[Reason],
    warnings: list[str],
    context: int | None = None,
) -> ServingPlan:
    variant = embedded_variant()
    reasons = [*reasons, Reason(setting="backend", value="embedded", why=why)]
    model = variant.hf_id
    if (
        overrides.model
        and variant_by_id(overrides.model) is None
        and not _is_known_hf_id(overrides.model)
    ):
        model = overrides.model
        reasons.append(
            Reason(
                setting="model",
                value=model,
                why=f"operator override; served with the defaults of {variant.id}",
                source="override",
            )
        )
    elif overrides.model and overrides.model != variant.id:
        warnings.append(
            f"model override {overrides.model!r} needs an NVIDIA GPU; serving {variant.id}"
        )
    else:
        reasons.append(
            Reason(
                setting="model",
                value=model,
                why=(
                    f"{variant.family_name}, {variant.quantization} GGUF from the "
                    f"{variant.gguf_package} package"
                ),
            )
        )
    max_model_len = overrides.max_model_len or context or variant.native_context
    max_num_seqs = overrides.max_num_seqs or variant.max_num_seqs or 1
    reasons += _simple_limit_reasons(overrides, variant, max_model_len, max_num_seqs, context)
    # The embedded server NTK-scales RoPE past the native context: a configured context longer
    # than that is intended; only an override to it is worth a warning.
    if overrides.max_model_len and max_model_len > variant.native_context:
        warnings.append(
            f"max_model_len {max_model_len} exceeds {variant.id}'s native context "
            f"{variant.native_context}"
        )
    return ServingPlan(
        backend="embedded",
        variant=variant.id,
        model=model,
        served_model_name=served_model_name,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        reasons=reasons,
        warnings=warnings,
    )


def _simple_limit_reasons(
    overrides: PlanOverrides,
    variant: ModelVariant,
    max_model_len: int,
    max_num_seqs: int,
    context: int | None = None,
) -> list[Reason]:
    len_src = "override" if overrides.max_model_len else "planner"
    seq_src = "override" if overrides.max_num_seqs else "planner"
    if overrides.max_model_len:
        len_why = "operator override"
    elif context:
        len_why = f"inference.embedded_context (RoPE NTK-scaled past {variant.native_context})"
    else:
        len_why = f"native context of {variant.id}"
    seq_why = (
        "operator override"
        if overrides.max_num_seqs
        else f"{variant.source.get('max_num_seqs', 'table default')}"
    )
    return [
        Reason(setting="max_model_len", value=str(max_model_len), why=len_why, source=len_src),
        Reason(setting="max_num_seqs", value=str(max_num_seqs), why=seq_why, source=seq_src),
    ]


def _is_known_hf_id(model: str) -> bool:
    return any(v.hf_id == model for v in model_table())


def _override_variant(overrides: PlanOverrides) -> ModelVariant | None:
    """A model override that names a known variant, by id or by Hugging Face id."""
    if not overrides.model:
        return None
    return variant_by_id(overrides.model) or next(
        (v for v in model_table() if v.hf_id == overrides.model), None
    )


def _fit_warnings(fit: Fit, device: Device) -> list[str]:
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
            f"gpu_memory_utilization {fit.utilization:.2f} x {_gib(device.total_gib)} = "
            f"{_gib(fit.utilization * device.total_gib)} exceeds the {_gib(device.free_gib)} free: "
            "vLLM will refuse to start"
        )
    if fit.tp > device.count:
        warnings.append(
            f"tensor_parallel_size {fit.tp} needs {fit.tp} GPUs, this host has {device.count}: "
            "vLLM will fail to start"
        )
    if not fit.fits:
        warnings.append(
            f"{fit.variant.id} at TP{fit.tp} does not fit: needs {_gib(fit.need_gib)} per GPU, "
            f"budget {_gib(fit.budget_gib)}; expect vLLM to fail at start"
        )
    elif fit.cache_gib < settings.tight_cache_gib:
        warnings.append(
            f"tight fit: {_gib(fit.cache_gib)} left per GPU for the KV cache and Mamba state after "
            f"weights and overhead; expect short context and little concurrency"
        )
    return warnings


def _limit_settings(fit: Fit, overrides: PlanOverrides) -> tuple[int, int, list[Reason], list[str]]:
    """--max-model-len and --max-num-seqs, computed or overridden, with their reasons."""
    reasons: list[Reason] = []
    warnings: list[str] = []
    native = fit.variant.native_context
    max_model_len, why = _context(fit)
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
                f"{_gib(fit.sequence_gib(max_model_len))}, cache has {_gib(fit.cache_gib)}"
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
    max_num_seqs, why = _concurrency(fit, max_model_len)
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


def _override_reasons(fit: Fit, overrides: PlanOverrides) -> list[Reason]:
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


def _vllm_plan(
    host: HostSnapshot,
    device: Device,
    fit: Fit,
    overrides: PlanOverrides,
    reasons: list[Reason],
    warnings: list[str],
    names: tuple[str, str, int],
) -> ServingPlan:
    served_model_name, host_addr, port = names
    model = fit.variant.hf_id
    forced = _override_variant(overrides)
    if overrides.model and forced is not None:
        reasons.append(
            Reason(
                setting="model",
                value=model,
                why=f"operator override: variant {fit.variant.id}",
                source="override",
            )
        )
    else:
        reasons.append(_model_reason(fit, device))
    if overrides.model and forced is None:
        model = overrides.model
        reasons.append(
            Reason(
                setting="model",
                value=model,
                why=(
                    "operator override: not in models.yaml, served with the settings planned "
                    f"for {fit.variant.id}"
                ),
                source="override",
            )
        )
        warnings.append(
            f"memory arithmetic assumes {overrides.model!r} is sized like {fit.variant.id}"
        )
    if overrides.tensor_parallel_size is None:
        reasons.append(_tp_reason(fit))
    if overrides.gpu_memory_utilization is None:
        reasons.append(
            Reason(
                setting="--gpu-memory-utilization",
                value=f"{fit.utilization:.2f}",
                why=fit.utilization_why,
            )
        )
    reasons += _override_reasons(fit, overrides)
    reasons.append(_memory_reason(fit, device))
    max_model_len, max_num_seqs, limit_reasons, limit_warnings = _limit_settings(fit, overrides)
    reasons += limit_reasons
    reasons.append(_kv_reason(fit, overrides.kv_cache_dtype is not None))
    reasons += _recipe_reasons(fit.recipes)
    warnings += _fit_warnings(fit, device) + limit_warnings

    flags: dict[str, Any] = {
        "--tensor-parallel-size": fit.tp,
        "--max-model-len": max_model_len,
        "--gpu-memory-utilization": f"{fit.utilization:.2f}",
        "--max-num-seqs": max_num_seqs,
        "--kv-cache-dtype": fit.kv_cache_dtype,
    }
    recipe_flags, env = _recipe_flags(fit.recipes)
    flags.update(recipe_flags)
    argv = _argv(model, host_addr, port, served_model_name, flags)
    extra, dropped = _clean_extra_args(overrides.extra_args)
    for flag in dropped:
        warnings.append(f"dropped {flag} from extra_args: secrets never go in argv (visible in ps)")
    if extra:
        argv += extra
        reasons.append(
            Reason(
                setting="extra_args",
                value=" ".join(extra),
                why="operator override, appended last (the last occurrence of a flag wins)",
                source="override",
            )
        )
    return ServingPlan(
        backend="vllm",
        variant=fit.variant.id,
        model=model,
        served_model_name=served_model_name,
        tensor_parallel_size=fit.tp,
        gpu_memory_utilization=fit.utilization,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        kv_cache_dtype=fit.kv_cache_dtype,
        argv=argv,
        env=env,
        memory=_memory(fit, device),
        reasons=reasons,
        warnings=warnings,
    )


def plan_serving(
    host: HostSnapshot,
    overrides: PlanOverrides | None = None,
    *,
    served_model_name: str = "nemotron",
    host_addr: str = "127.0.0.1",
    port: int = 8000,
    embedded_context: int | None = None,
) -> ServingPlan:
    """Choose the model variant and the vLLM settings for this host, explaining every choice.
    `embedded_context` is the embedded server's context (config), when that is what runs."""
    overrides = overrides or PlanOverrides()
    if not host.has_gpu:
        why = f"no NVIDIA GPU/driver: {host.nvml_error or 'no GPU reported'}"
        return _embedded_plan(overrides, served_model_name, why, [], [], context=embedded_context)
    device = _device(host)
    if isinstance(device, str):
        return _embedded_plan(
            overrides, served_model_name, device, [], [device], context=embedded_context
        )
    reasons = [_device_reason(device)]
    warnings: list[str] = []
    if not device.unified and device.free_gib < 0.9 * device.total_gib:
        used = device.total_gib - device.free_gib
        warnings.append(
            f"other processes hold {_gib(used)} of GPU memory: the plan uses what is free"
        )

    forced = _override_variant(overrides)
    if forced is not None and forced.backend == "embedded":
        return _embedded_plan(
            overrides,
            served_model_name,
            "operator override",
            reasons,
            warnings,
            context=embedded_context,
        )
    if forced is not None:
        if _runs(forced, device.cc) is None:
            warnings.append(f"{forced.id}: {_unsupported(forced, device)}")
        fit = _forced(host, device, forced, overrides)
    else:
        fit, rejected = _select(host, device, overrides)
        reasons += rejected
        if fit is None:
            warnings.append("no Nemotron variant fits this GPU: serving the embedded CPU model")
            why = "no Nemotron variant fits the GPU memory"
            return _embedded_plan(
                overrides, served_model_name, why, reasons, warnings, context=embedded_context
            )
    names = (served_model_name, host_addr, port)
    return _vllm_plan(host, device, fit, overrides, reasons, warnings, names)
