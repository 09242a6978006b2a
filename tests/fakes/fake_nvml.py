"""A fake NVML at the pynvml boundary.

`FakeNVML` exposes the pynvml function names and constants that hardware.telemetry uses and
raises the REAL pynvml exception classes, built the way pynvml builds them
(`pynvml.NVMLError(code)` returns the matching subclass). Devices are plain dicts; a value that is
an exception is raised by the getter that reads it, so "NotSupported on this field" is one entry.

Values are what pynvml returns: bytes for memory, milliwatts for power, MHz, [current, pending]
for ECC and MIG modes, (major, minor) for compute capability.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import pynvml

MIB = 1024 * 1024


def nvml_error(code: int) -> pynvml.NVMLError:
    """The real pynvml exception for an NVML return code (e.g. NVMLError_NotSupported)."""
    return pynvml.NVMLError(code)


def not_supported() -> pynvml.NVMLError:
    return nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)


def memory(total_mib: int, used_mib: int, free_mib: int) -> SimpleNamespace:
    return SimpleNamespace(total=total_mib * MIB, used=used_mib * MIB, free=free_mib * MIB)


# An H100 SXM as nvidia-smi shows it on a DGX H100: everything supported, ECC on, MIG off.
H100_80GB_HBM3_SXM: dict[str, Any] = {
    "name": "NVIDIA H100 80GB HBM3",
    "uuid": "GPU-5a3b1c2d-0e4f-4a5b-8c6d-7e8f9a0b1c2d",
    "compute_capability": (9, 0),
    "architecture": pynvml.NVML_DEVICE_ARCH_HOPPER,
    "memory": memory(81559, 524, 81035),
    "utilization": SimpleNamespace(gpu=37, memory=12),
    "temperature": 41,
    "power_usage_mw": 312456,
    "enforced_power_limit_mw": 700000,
    "clock_sm": 1980,
    "clock_mem": 2619,
    "clock_event_reasons": pynvml.nvmlClocksEventReasonSwPowerCap,
    "ecc_mode": [pynvml.NVML_FEATURE_ENABLED, pynvml.NVML_FEATURE_ENABLED],
    "ecc_uncorrected_volatile": 0,
    "mig_mode": [pynvml.NVML_DEVICE_MIG_DISABLE, pynvml.NVML_DEVICE_MIG_DISABLE],
    "xid_events": [13],  # one pending XID (graphics engine exception), delivered on registration
}

# DGX Spark's GB10: unified memory, so no NVML memory figures, power limit, mem clock, ECC, MIG.
GB10: dict[str, Any] = {
    "name": "NVIDIA GB10",
    "uuid": "GPU-0b10aaaa-1111-4222-8333-944455556666",
    "compute_capability": (12, 1),
    "architecture": pynvml.NVML_DEVICE_ARCH_BLACKWELL,
    "memory": not_supported(),
    "utilization": SimpleNamespace(gpu=3, memory=0),
    "temperature": 44,
    "power_usage_mw": 11250,
    "enforced_power_limit_mw": not_supported(),
    "clock_sm": 2405,
    "clock_mem": not_supported(),
    "clock_event_reasons": pynvml.nvmlClocksEventReasonGpuIdle,
    "ecc_mode": not_supported(),
    "ecc_uncorrected_volatile": not_supported(),
    "mig_mode": not_supported(),
    "xid_events": [],
}

# A GeForce card: no ECC, no MIG; idle at the desktop.
RTX_4090: dict[str, Any] = {
    "name": "NVIDIA GeForce RTX 4090",
    "uuid": "GPU-40904090-aaaa-4bbb-8ccc-dddddddddddd",
    "compute_capability": (8, 9),
    "architecture": pynvml.NVML_DEVICE_ARCH_ADA,
    "memory": memory(24564, 1234, 23330),
    "utilization": SimpleNamespace(gpu=0, memory=0),
    "temperature": 35,
    "power_usage_mw": 28512,
    "enforced_power_limit_mw": 450000,
    "clock_sm": 210,
    "clock_mem": 405,
    "clock_event_reasons": pynvml.nvmlClocksEventReasonGpuIdle,
    "ecc_mode": not_supported(),
    "ecc_uncorrected_volatile": not_supported(),
    "mig_mode": not_supported(),
    "xid_events": [],
}


class FakeHandle:
    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"FakeHandle({self.index})"


class FakeEventSet:
    def __init__(self) -> None:
        self.pending: list[SimpleNamespace] = []
        self.freed = False


class FakeNVML:
    """Same names as pynvml; records init/shutdown and event-set frees so tests can check them."""

    # The constants telemetry passes back in, copied from the real bindings.
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_CLOCK_SM = pynvml.NVML_CLOCK_SM
    NVML_CLOCK_MEM = pynvml.NVML_CLOCK_MEM
    NVML_FEATURE_ENABLED = pynvml.NVML_FEATURE_ENABLED
    NVML_FEATURE_DISABLED = pynvml.NVML_FEATURE_DISABLED
    NVML_DEVICE_MIG_ENABLE = pynvml.NVML_DEVICE_MIG_ENABLE
    NVML_DEVICE_MIG_DISABLE = pynvml.NVML_DEVICE_MIG_DISABLE
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    NVML_VOLATILE_ECC = pynvml.NVML_VOLATILE_ECC
    nvmlEventTypeXidCriticalError = pynvml.nvmlEventTypeXidCriticalError

    def __init__(
        self,
        devices: list[dict[str, Any]] | None = None,
        *,
        init_error: int | None = None,
        driver_version: str = "580.95.05",
        cuda_driver_version: int = 13000,
        bytes_strings: bool = False,
    ) -> None:
        # Deep copies: a test may mutate its devices without touching the shared specs.
        self.devices = [copy.deepcopy(d) for d in devices or []]
        self.init_error = init_error
        self.driver_version = driver_version
        self.cuda_driver_version = cuda_driver_version
        self.bytes_strings = bytes_strings  # old pynvml returned bytes for strings
        self.initialised = False
        self.init_calls = 0
        self.shutdown_calls = 0
        self.event_sets: list[FakeEventSet] = []

    # -- helpers ------------------------------------------------------------------------------
    def _check_init(self) -> None:
        if not self.initialised:
            raise nvml_error(pynvml.NVML_ERROR_UNINITIALIZED)

    def _value(self, handle: FakeHandle, key: str) -> Any:
        self._check_init()
        value = self.devices[handle.index][key]
        if isinstance(value, pynvml.NVMLError):
            raise nvml_error(value.value)  # a fresh instance, like each real call
        return value

    def _str(self, value: str) -> str | bytes:
        return value.encode() if self.bytes_strings else value

    # -- library ------------------------------------------------------------------------------
    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise nvml_error(self.init_error)
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self._check_init()
        self.shutdown_calls += 1
        self.initialised = False

    def nvmlSystemGetDriverVersion(self) -> str | bytes:
        self._check_init()
        return self._str(self.driver_version)

    def nvmlSystemGetCudaDriverVersion_v2(self) -> int:
        self._check_init()
        return self.cuda_driver_version

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._check_init()
        return self.cuda_driver_version

    def nvmlDeviceGetCount(self) -> int:
        self._check_init()
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        self._check_init()
        if not 0 <= index < len(self.devices):
            raise nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return FakeHandle(index)

    # -- device getters -----------------------------------------------------------------------
    def nvmlDeviceGetName(self, handle: FakeHandle) -> str | bytes:
        return self._str(self._value(handle, "name"))

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str | bytes:
        return self._str(self._value(handle, "uuid"))

    def nvmlDeviceGetCudaComputeCapability(self, handle: FakeHandle) -> tuple[int, int]:
        return self._value(handle, "compute_capability")

    def nvmlDeviceGetArchitecture(self, handle: FakeHandle) -> int:
        return self._value(handle, "architecture")

    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle) -> SimpleNamespace:
        return self._value(handle, "memory")

    def nvmlDeviceGetUtilizationRates(self, handle: FakeHandle) -> SimpleNamespace:
        return self._value(handle, "utilization")

    def nvmlDeviceGetTemperatureV(self, handle: FakeHandle, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._value(handle, "temperature")

    def nvmlDeviceGetTemperature(self, handle: FakeHandle, sensor: int) -> int:
        # Deprecated in pynvml 13 (removed in CUDA 14); the only one on old drivers.
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._value(handle, "temperature")

    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        return self._value(handle, "power_usage_mw")

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeHandle) -> int:
        return self._value(handle, "enforced_power_limit_mw")

    def nvmlDeviceGetClockInfo(self, handle: FakeHandle, clock_type: int) -> int:
        keys = {pynvml.NVML_CLOCK_SM: "clock_sm", pynvml.NVML_CLOCK_MEM: "clock_mem"}
        if clock_type not in keys:
            raise nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self._value(handle, keys[clock_type])

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: FakeHandle) -> int:
        return self._value(handle, "clock_event_reasons")

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: FakeHandle) -> int:
        # The deprecated name: same data, kept so the fallback path can be tested.
        return self._value(handle, "clock_event_reasons")

    def nvmlDeviceGetEccMode(self, handle: FakeHandle) -> list[int]:
        return self._value(handle, "ecc_mode")

    def nvmlDeviceGetTotalEccErrors(
        self, handle: FakeHandle, error_type: int, counter_type: int
    ) -> int:
        assert error_type == pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
        assert counter_type == pynvml.NVML_VOLATILE_ECC
        return self._value(handle, "ecc_uncorrected_volatile")

    def nvmlDeviceGetMigMode(self, handle: FakeHandle) -> list[int]:
        return self._value(handle, "mig_mode")

    # -- events -------------------------------------------------------------------------------
    def nvmlEventSetCreate(self) -> FakeEventSet:
        self._check_init()
        event_set = FakeEventSet()
        self.event_sets.append(event_set)
        return event_set

    def nvmlDeviceRegisterEvents(
        self, handle: FakeHandle, event_types: int, event_set: FakeEventSet
    ) -> None:
        xids = self._value(handle, "xid_events")  # NotSupported here -> raised
        if event_types & pynvml.nvmlEventTypeXidCriticalError:
            event_set.pending += [
                SimpleNamespace(
                    device=handle,
                    eventType=pynvml.nvmlEventTypeXidCriticalError,
                    eventData=xid,
                    gpuInstanceId=0xFFFFFFFF,
                    computeInstanceId=0xFFFFFFFF,
                )
                for xid in xids
            ]

    def nvmlEventSetWait_v2(self, event_set: FakeEventSet, timeout_ms: int) -> SimpleNamespace:
        self._check_init()
        assert timeout_ms == 0, "telemetry must never block on events"
        if not event_set.pending:
            raise nvml_error(pynvml.NVML_ERROR_TIMEOUT)
        return event_set.pending.pop(0)

    def nvmlEventSetFree(self, event_set: FakeEventSet) -> None:
        self._check_init()
        event_set.freed = True


# -- ready-made hosts ---------------------------------------------------------------------------
def h100_host(**kwargs: Any) -> FakeNVML:
    return FakeNVML([H100_80GB_HBM3_SXM], **kwargs)


def gb10_host(**kwargs: Any) -> FakeNVML:
    return FakeNVML([GB10], **kwargs)


def rtx4090_host(**kwargs: Any) -> FakeNVML:
    return FakeNVML([RTX_4090], **kwargs)


def no_driver_host() -> FakeNVML:
    return FakeNVML(init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)


def no_library_host() -> FakeNVML:
    return FakeNVML(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
