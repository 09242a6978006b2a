"""What the appliance knows about its host: what the telemetry layer fills and the planner reads.

Every field that a driver may not report is optional: None means "unknown / not supported",
never zero. Snapshots round-trip through JSON so that recorded hosts serve as test fixtures.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


class HostClass(StrEnum):
    DGX_SPARK = "dgx_spark"  # GB10 superchip, unified memory
    RTX = "rtx"  # workstation / consumer RTX cards
    DATACENTER = "datacenter"  # H100, H200, B200, L40S, A100 ...
    CPU_ONLY = "cpu_only"  # no usable NVIDIA driver


class XidEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    xid: int
    timestamp_us: int | None = None


class GpuInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: int
    name: str
    uuid: str | None = None
    compute_capability: str | None = None  # "major.minor", e.g. "12.1"
    architecture: str | None = None  # "blackwell", "hopper", "ada", ...
    unified_memory: bool = False  # GB10: memory is the host's, read from /proc/meminfo
    memory_total_mib: int | None = None
    memory_used_mib: int | None = None
    memory_free_mib: int | None = None
    utilization_gpu_pct: int | None = None
    utilization_memory_pct: int | None = None
    temperature_c: int | None = None
    power_draw_w: float | None = None
    power_limit_w: float | None = None
    clock_sm_mhz: int | None = None
    clock_memory_mhz: int | None = None
    throttle_reasons: list[str] | None = None
    ecc_enabled: bool | None = None
    ecc_uncorrected_errors: int | None = None
    mig_enabled: bool | None = None
    xid_events: list[XidEvent] | None = None  # None: XID events not supported here

    @property
    def cc_tuple(self) -> tuple[int, int] | None:
        if not self.compute_capability:
            return None
        major, minor = self.compute_capability.split(".")
        return int(major), int(minor)


class HostSnapshot(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host_class: HostClass
    product_name: str | None = None  # DMI product name or device-tree model
    cpu_count: int
    memory_total_mib: int
    memory_available_mib: int
    driver_version: str | None = None
    cuda_driver_version: str | None = None  # "13.0"
    nvml_error: str | None = None  # why there is no GPU view, when there is none
    gpus: list[GpuInfo] = Field(default_factory=list)

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)
