"""The serving planner: host facts in, a serving plan out.

`plan_serving` is a pure function of a `HostSnapshot` and the operator's `PlanOverrides`. Its only
input besides those is the packaged tables `hardware/data/models.yaml` (which models exist, how
big they are, what their cache costs) and `hardware/data/recipes.yaml` (the vLLM flags per recipe
and the planner's tunables). Which model and which recipe apply is decided by those tables; the
code only does the arithmetic and explains each step as a `Reason`.

The arithmetic is in `plan_fit` (what the GPUs offer, which candidate fits) and `plan_settings`
(the settings of the chosen candidate and their reasons); this module assembles the plan.
"""

from __future__ import annotations

from typing import Any

from hardware.catalog import ModelVariant, embedded_variant, model_table, variant_by_id
from hardware.plan_fit import (
    Device,
    Fit,
    device_view,
    forced_fit,
    gib,
    runs,
    select_fit,
    unsupported,
)
from hardware.plan_settings import (
    clean_extra_args,
    device_reason,
    fit_warnings,
    kv_reason,
    limit_settings,
    memory_budget,
    memory_reason,
    merged_recipe_flags,
    model_reason,
    override_reasons,
    recipe_reasons,
    tp_reason,
    vllm_argv,
)
from hardware.plan_types import PlanOverrides, Reason, ServingPlan
from hardware.snapshot import HostSnapshot


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
        reasons.append(model_reason(fit, device))
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
        reasons.append(tp_reason(fit))
    if overrides.gpu_memory_utilization is None:
        reasons.append(
            Reason(
                setting="--gpu-memory-utilization",
                value=f"{fit.utilization:.2f}",
                why=fit.utilization_why,
            )
        )
    reasons += override_reasons(fit, overrides)
    reasons.append(memory_reason(fit, device))
    max_model_len, max_num_seqs, limit_reasons, limit_warnings = limit_settings(fit, overrides)
    reasons += limit_reasons
    reasons.append(kv_reason(fit, overrides.kv_cache_dtype is not None))
    reasons += recipe_reasons(fit.recipes)
    warnings += fit_warnings(fit, device) + limit_warnings

    flags: dict[str, Any] = {
        "--tensor-parallel-size": fit.tp,
        "--max-model-len": max_model_len,
        "--gpu-memory-utilization": f"{fit.utilization:.2f}",
        "--max-num-seqs": max_num_seqs,
        "--kv-cache-dtype": fit.kv_cache_dtype,
    }
    recipe_flags, env = merged_recipe_flags(fit.recipes)
    flags.update(recipe_flags)
    argv = vllm_argv(model, host_addr, port, served_model_name, flags)
    extra, dropped = clean_extra_args(overrides.extra_args)
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
        memory=memory_budget(fit, device),
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
    device = device_view(host)
    if isinstance(device, str):
        return _embedded_plan(
            overrides, served_model_name, device, [], [device], context=embedded_context
        )
    reasons = [device_reason(device)]
    warnings: list[str] = []
    if not device.unified and device.free_gib < 0.9 * device.total_gib:
        used = device.total_gib - device.free_gib
        warnings.append(
            f"other processes hold {gib(used)} of GPU memory: the plan uses what is free"
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
        if runs(forced, device.cc) is None:
            warnings.append(f"{forced.id}: {unsupported(forced, device)}")
        fit = forced_fit(host, device, forced, overrides)
    else:
        fit, rejected = select_fit(host, device, overrides)
        reasons += rejected
        if fit is None:
            warnings.append("no Nemotron variant fits this GPU: serving the embedded CPU model")
            why = "no Nemotron variant fits the GPU memory"
            return _embedded_plan(
                overrides, served_model_name, why, reasons, warnings, context=embedded_context
            )
    names = (served_model_name, host_addr, port)
    return _vllm_plan(host, device, fit, overrides, reasons, warnings, names)
