"""The serving plan: what the planner decides, and the operator overrides it must honour."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class PlanOverrides(BaseModel):
    """Operator overrides (config or flags). Each set field wins and is shown as an override."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str | None = None  # a variant id from models.yaml, or a HF id / local path
    gpu_memory_utilization: float | None = Field(default=None, gt=0.0, le=1.0)
    max_model_len: int | None = Field(default=None, ge=256)
    max_num_seqs: int | None = Field(default=None, ge=1)
    tensor_parallel_size: int | None = Field(default=None, ge=1)
    kv_cache_dtype: str | None = None
    extra_args: list[str] = Field(default_factory=list)


class Reason(BaseModel):
    """Why one setting has its value."""

    model_config = ConfigDict(extra="forbid")

    setting: str  # "model", "--gpu-memory-utilization", ...
    value: str
    why: str
    source: Literal["planner", "recipe", "override"] = "planner"


class MemoryBudget(BaseModel):
    """The arithmetic behind the context length and concurrency, per GPU, in GiB."""

    model_config = ConfigDict(extra="forbid")

    device_total_gib: float
    device_free_gib: float
    utilization: float
    budget_gib: float  # device_total_gib * utilization
    weights_gib: float  # per GPU, after tensor parallelism
    overhead_gib: float  # activations, CUDA graphs, allocator slack
    cache_gib: float  # what remains for the KV cache and Mamba state


class ServingPlan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: Literal["vllm", "embedded"]
    variant: str  # id in hardware/data/models.yaml, e.g. "super-nvfp4"
    model: str  # Hugging Face id (vLLM) or embedded model id
    served_model_name: str
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    max_model_len: int
    max_num_seqs: int
    kv_cache_dtype: str | None = None
    argv: list[str] = Field(
        default_factory=list
    )  # the full `vllm serve ...` argv; empty if embedded
    env: dict[str, str] = Field(default_factory=dict)
    memory: MemoryBudget | None = None
    reasons: list[Reason] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
