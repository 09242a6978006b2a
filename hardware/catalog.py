"""The packaged tables the planner reads: model variants (models.yaml) and vLLM recipes
(recipes.yaml), validated once on first use."""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, field_validator

from hardware.snapshot import HostClass

# Flags the planner computes itself: recipes bound them through caps, never set them directly.
PLANNER_FLAGS = (
    "--tensor-parallel-size",
    "--max-model-len",
    "--gpu-memory-utilization",
    "--max-num-seqs",
    "--kv-cache-dtype",
)


class ModelVariant(BaseModel):
    """One row of models.yaml: a variant with its family's fields merged in."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    family: str
    family_name: str
    tier: int
    backend: Literal["vllm", "embedded"]
    hf_id: str
    quantization: str
    weights_gib: float
    native_min_cc: str | None
    emulated_min_cc: str | None
    kv_cache_dtype: str | None
    native_context: int
    moe: bool
    attention_layers: int
    kv_heads: int
    head_dim: int
    kv_bytes_per_token: dict[str, int]
    mamba_layers: int
    mamba_state_mib: float
    overhead_gib: float
    max_num_seqs: int | None = None
    gguf_package: str | None = None
    gguf_file: str | None = None
    source: dict[str, str]


class RecipeMatch(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host_class: list[HostClass] | None = None
    family: list[str] | None = None
    variant: list[str] | None = None
    quantization: list[str] | None = None
    native: bool | None = None
    min_tensor_parallel: int | None = None


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    description: str
    source: str
    match: RecipeMatch
    gpu_memory_utilization: float | None = None
    max_num_seqs_cap: int | None = None
    env: dict[str, str] = {}
    flags: dict[str, Any] = {}

    @field_validator("flags")
    @classmethod
    def _no_planner_flags(cls, flags: dict[str, Any]) -> dict[str, Any]:
        owned = sorted(set(flags) & set(PLANNER_FLAGS))
        if owned:
            raise ValueError(f"{owned} are computed by the planner; bound them with caps instead")
        return flags


class PlannerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    headroom_gib: dict[Literal["discrete", "unified"], float]
    utilization_floor: dict[Literal["discrete", "unified"], float | None]
    min_useful_context: int
    context_ladder: list[int]
    concurrency_context: int
    tight_cache_gib: float
    tensor_parallel_sizes: list[int]
    source: dict[str, str] = {}


class RecipeBook(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    planner: PlannerSettings
    recipes: list[Recipe]


def _read_table(name: str) -> Any:
    text = (resources.files("hardware") / "data" / name).read_text(encoding="utf-8")
    return yaml.safe_load(text)


@cache
def model_table() -> tuple[ModelVariant, ...]:
    """All variants, family fields merged in, in file order."""
    raw = _read_table("models.yaml")
    families = {f["id"]: f for f in raw["families"]}
    variants = []
    for row in raw["variants"]:
        family = dict(families[row["family"]])
        family_source = family.pop("source", {})
        family_name = family.pop("name")
        family.pop("id")
        merged = {**family, **row, "family_name": family_name}
        merged["source"] = {**family_source, **row.get("source", {})}
        variants.append(ModelVariant.model_validate(merged))
    return tuple(variants)


@cache
def recipe_book() -> RecipeBook:
    return RecipeBook.model_validate(_read_table("recipes.yaml"))


def variant_by_id(variant_id: str) -> ModelVariant | None:
    return next((v for v in model_table() if v.id == variant_id), None)


def embedded_variant() -> ModelVariant:
    return next(v for v in model_table() if v.backend == "embedded")


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
