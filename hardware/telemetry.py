"""One-shot host snapshot: NVML for the GPUs, /proc and /sys for the rest. Never raises for a
missing driver or an unsupported field; the reason lands in the snapshot instead.

`nvml` is the pynvml module, or any object with the same function names and constants (tests
pass a fake). One nvmlInit, no sleeps: XID events are drained with a zero timeout.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hardware.host import detect_host_class, read_meminfo, read_product_name
from hardware.nvml import (
    NVML_CALL_ERRORS,
    architecture_name,
    attempt,
    cuda_version_text,
    decode_clock_reasons,
    describe_init_error,
    is_not_supported,
    query,
    text,
)
from hardware.snapshot import GpuInfo, HostClass, HostSnapshot, XidEvent

MIB = 1024 * 1024
# Integrated GPUs whose memory is the host's RAM: NVML has no memory figures for them.
UNIFIED_MEMORY_GPU_TOKENS: tuple[str, ...] = ("GB10", "ORIN", "THOR")
# Bound on events drained per device, so a storm of XIDs cannot stall a snapshot.
MAX_XID_EVENTS = 64


def _is_unified(gpu_name: str, product_name: str | None) -> bool:
    upper = gpu_name.upper()
    if any(token in upper for token in UNIFIED_MEMORY_GPU_TOKENS):
        return True
    return bool(product_name and "DGX SPARK" in product_name.upper())


def _fn(nvml: Any, *names: str) -> Any:
    """First of these NVML functions that exists in these bindings (they get renamed)."""
    for name in names:
        fn = getattr(nvml, name, None)
        if fn is not None:
            return fn
    return None


def _first(nvml: Any, names: tuple[str, ...], *args: Any) -> Any:
    """The first answer from NVML functions that were renamed across versions (newest first)."""
    for name in names:
        value = query(getattr(nvml, name, None), *args)
        if value is not None:
            return value
    return None


# pynvml 13 deprecates the old names ("removed in CUDA 14"); old drivers lack the new symbols.
CLOCK_REASON_FNS = (
    "nvmlDeviceGetCurrentClocksEventReasons",
    "nvmlDeviceGetCurrentClocksThrottleReasons",
)
TEMPERATURE_FNS = ("nvmlDeviceGetTemperatureV", "nvmlDeviceGetTemperature")
CUDA_VERSION_FNS = ("nvmlSystemGetCudaDriverVersion_v2", "nvmlSystemGetCudaDriverVersion")


def _poll_xid_events(nvml: Any, handle: Any) -> list[XidEvent] | None:
    """Drain XID critical errors without blocking. None when the device cannot report them.

    An event set only sees events raised after it was registered, so a one-shot poll mostly
    returns []; a long-running monitor would keep the set open between polls.
    """
    event_set, error = attempt(nvml.nvmlEventSetCreate)
    if error is not None:
        return None
    try:
        _, error = attempt(
            nvml.nvmlDeviceRegisterEvents, handle, nvml.nvmlEventTypeXidCriticalError, event_set
        )
        if error is not None:
            return None
        events: list[XidEvent] = []
        wait = _fn(nvml, "nvmlEventSetWait_v2", "nvmlEventSetWait")
        for _ in range(MAX_XID_EVENTS):
            # Timeout (nothing pending) ends the drain; so does any other error.
            data, error = attempt(wait, event_set, 0)
            if error is not None:
                break
            if int(data.eventType) & nvml.nvmlEventTypeXidCriticalError:
                events.append(XidEvent(xid=int(data.eventData)))
        return events
    finally:
        query(nvml.nvmlEventSetFree, event_set)


def _enabled(state: Any, enabled_value: int) -> bool | None:
    """NVML returns [current, pending] for ECC and MIG modes; we report the current one."""
    if state is None:
        return None
    return int(state[0]) == enabled_value


def _watts(milliwatts: Any) -> float | None:
    return None if milliwatts is None else milliwatts / 1000.0


def _gpu(
    nvml: Any, index: int, handle: Any, product_name: str | None, meminfo: tuple[int, int]
) -> GpuInfo:
    name = text(query(nvml.nvmlDeviceGetName, handle)) or f"NVIDIA GPU {index}"
    cc_pair = query(nvml.nvmlDeviceGetCudaComputeCapability, handle)
    cc = f"{cc_pair[0]}.{cc_pair[1]}" if cc_pair else None
    arch = architecture_name(
        query(getattr(nvml, "nvmlDeviceGetArchitecture", None), handle), cc, name
    )

    unified = _is_unified(name, product_name)
    mem, mem_error = attempt(nvml.nvmlDeviceGetMemoryInfo, handle)
    total = used = free = None
    if mem is not None:
        total, used, free = mem.total // MIB, mem.used // MIB, mem.free // MIB
    elif unified and is_not_supported(mem_error):
        # GB10: the GPU allocates from system RAM, so the host's view is the GPU's view.
        total, free = meminfo
        used = total - free
    util = query(nvml.nvmlDeviceGetUtilizationRates, handle)

    clock = nvml.nvmlDeviceGetClockInfo
    return GpuInfo(
        index=index,
        name=name,
        uuid=text(query(nvml.nvmlDeviceGetUUID, handle)),
        compute_capability=cc,
        architecture=arch,
        unified_memory=unified,
        memory_total_mib=total,
        memory_used_mib=used,
        memory_free_mib=free,
        utilization_gpu_pct=None if util is None else int(util.gpu),
        utilization_memory_pct=None if util is None else int(util.memory),
        temperature_c=_first(nvml, TEMPERATURE_FNS, handle, nvml.NVML_TEMPERATURE_GPU),
        power_draw_w=_watts(query(nvml.nvmlDeviceGetPowerUsage, handle)),
        power_limit_w=_watts(query(nvml.nvmlDeviceGetEnforcedPowerLimit, handle)),
        clock_sm_mhz=query(clock, handle, nvml.NVML_CLOCK_SM),
        clock_memory_mhz=query(clock, handle, nvml.NVML_CLOCK_MEM),
        throttle_reasons=decode_clock_reasons(_first(nvml, CLOCK_REASON_FNS, handle)),
        ecc_enabled=_enabled(query(nvml.nvmlDeviceGetEccMode, handle), nvml.NVML_FEATURE_ENABLED),
        ecc_uncorrected_errors=query(
            nvml.nvmlDeviceGetTotalEccErrors,
            handle,
            nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
            nvml.NVML_VOLATILE_ECC,
        ),
        mig_enabled=_enabled(
            query(getattr(nvml, "nvmlDeviceGetMigMode", None), handle), nvml.NVML_DEVICE_MIG_ENABLE
        ),
        xid_events=_poll_xid_events(nvml, handle),
    )


def collect(nvml: Any = None, root: Path = Path("/")) -> HostSnapshot:
    """Snapshot this host. `nvml` defaults to pynvml; `root` is where /proc and /sys live."""
    product_name = read_product_name(root)
    meminfo = read_meminfo(root)
    host: dict[str, Any] = {
        "product_name": product_name,
        "cpu_count": os.cpu_count() or 1,
        "memory_total_mib": meminfo[0],
        "memory_available_mib": meminfo[1],
    }
    if nvml is None:
        import pynvml as nvml  # lazily: only a real collect needs the real bindings

    try:
        nvml.nvmlInit()
    except (*NVML_CALL_ERRORS, OSError) as exc:
        return HostSnapshot(
            host_class=HostClass.CPU_ONLY, nvml_error=describe_init_error(exc), **host
        )

    try:
        driver = text(query(nvml.nvmlSystemGetDriverVersion))
        cuda = _first(nvml, CUDA_VERSION_FNS)
        gpus: list[GpuInfo] = []
        for index in range(query(nvml.nvmlDeviceGetCount, default=0)):
            handle = query(nvml.nvmlDeviceGetHandleByIndex, index)
            if handle is not None:  # a lost or inaccessible GPU: report the others
                gpus.append(_gpu(nvml, index, handle, product_name, meminfo))
    finally:
        query(nvml.nvmlShutdown)

    # Without a usable GPU the box serves from the CPU whatever its product name says.
    host_class = (
        detect_host_class(product_name, [g.name for g in gpus]) if gpus else HostClass.CPU_ONLY
    )
    return HostSnapshot(
        host_class=host_class,
        driver_version=driver,
        cuda_driver_version=cuda_version_text(cuda),
        nvml_error=None if gpus else "NVML initialised but reports no GPU",
        gpus=gpus,
        **host,
    )
