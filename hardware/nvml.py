"""A thin guarded layer over pynvml: calls that never crash, and decoding tables kept as data.

Any single NVML call may fail on some device (NotSupported on GeForce and GB10, NoPermission in
containers, GpuIsLost after an XID 79 ...). One failed field must never cost the whole snapshot,
so every per-device call goes through `query`, which turns an NVML error into a default.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

import pynvml  # importing does not load libnvidia-ml; nvmlInit does

T = TypeVar("T")

# Errors that mean "this call has no answer here", never "the program is wrong". The mismatch
# error is raised by pynvml's unversioned wrappers when the driver is older than the bindings.
NVML_CALL_ERRORS: tuple[type[Exception], ...] = (
    pynvml.NVMLError,
    pynvml.NVMLLibraryMismatchError,
)


def attempt(fn: Callable[..., T], *args: Any) -> tuple[T | None, Exception | None]:
    """Call an NVML function; return (value, None) or (None, the NVML error it raised)."""
    try:
        return fn(*args), None
    except NVML_CALL_ERRORS as exc:
        return None, exc


def query(fn: Callable[..., T] | None, *args: Any, default: Any = None) -> Any:
    """Call an NVML function; return `default` when it fails or does not exist in these bindings."""
    if fn is None:
        return default
    value, error = attempt(fn, *args)
    return default if error is not None else value


def describe_init_error(exc: BaseException) -> str:
    """A short human reason for an nvmlInit failure (shown by status and doctor)."""
    if isinstance(exc, pynvml.NVMLError_LibraryNotFound):
        return "NVML library (libnvidia-ml.so.1) not found: no NVIDIA driver installed"
    if isinstance(exc, pynvml.NVMLError_DriverNotLoaded):
        return "NVIDIA driver not loaded"
    if isinstance(exc, pynvml.NVMLError_NoPermission):
        return "no permission to open the NVIDIA device"
    if isinstance(exc, pynvml.NVMLError_LibRmVersionMismatch):
        return "NVML library and kernel driver versions differ (reboot or reinstall the driver)"
    if isinstance(exc, OSError):
        return f"cannot load NVML: {exc}"
    return f"nvmlInit failed: {exc}"


def is_not_supported(error: Exception | None) -> bool:
    return isinstance(error, pynvml.NVMLError_NotSupported)


def text(value: Any) -> str | None:
    """Old pynvml returned bytes for names, UUIDs and versions; newer returns str."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return str(value).strip("\x00").strip() or None


def _const(name: str, fallback: int) -> int:
    # Older bindings name the reasons "ClocksThrottleReason*"; the values are the NVML ABI.
    return int(getattr(pynvml, name, fallback))


# Clock event ("throttle") reason bits -> words, in bit order.
CLOCK_EVENT_REASONS: dict[int, str] = {
    _const("nvmlClocksEventReasonGpuIdle", 0x1): "gpu_idle",
    _const("nvmlClocksEventReasonApplicationsClocksSetting", 0x2): "applications_clocks_setting",
    _const("nvmlClocksEventReasonSwPowerCap", 0x4): "sw_power_cap",
    _const("nvmlClocksEventReasonHwSlowdown", 0x8): "hw_slowdown",
    _const("nvmlClocksEventReasonSyncBoost", 0x10): "sync_boost",
    _const("nvmlClocksEventReasonSwThermalSlowdown", 0x20): "sw_thermal_slowdown",
    _const("nvmlClocksEventReasonHwThermalSlowdown", 0x40): "hw_thermal_slowdown",
    _const("nvmlClocksEventReasonHwPowerBrakeSlowdown", 0x80): "hw_power_brake_slowdown",
    _const("nvmlClocksEventReasonDisplayClockSetting", 0x100): "display_clock_setting",
}

_KNOWN_REASON_BITS = sum(CLOCK_EVENT_REASONS)


def decode_clock_reasons(mask: int | None) -> list[str] | None:
    """Bitmask -> words; [] means "not throttled", None means "unknown". Unknown bits are kept."""
    if mask is None:
        return None
    words = [word for bit, word in CLOCK_EVENT_REASONS.items() if mask & bit]
    rest = mask & ~_KNOWN_REASON_BITS
    words += [f"unknown_{1 << i:#x}" for i in range(64) if rest & (1 << i)]
    return words


# nvmlDeviceGetArchitecture enum -> name. Built with getattr so older bindings still import.
ARCHITECTURES: dict[int, str] = {
    int(getattr(pynvml, const)): name
    for const, name in (
        ("NVML_DEVICE_ARCH_KEPLER", "kepler"),
        ("NVML_DEVICE_ARCH_MAXWELL", "maxwell"),
        ("NVML_DEVICE_ARCH_PASCAL", "pascal"),
        ("NVML_DEVICE_ARCH_VOLTA", "volta"),
        ("NVML_DEVICE_ARCH_TURING", "turing"),
        ("NVML_DEVICE_ARCH_AMPERE", "ampere"),
        ("NVML_DEVICE_ARCH_ADA", "ada"),
        ("NVML_DEVICE_ARCH_HOPPER", "hopper"),
        ("NVML_DEVICE_ARCH_BLACKWELL", "blackwell"),
        ("NVML_DEVICE_ARCH_RUBIN", "rubin"),
    )
    if hasattr(pynvml, const)
}

# Compute capability major (or "major.minor") -> architecture, for drivers whose enum is unknown.
CC_ARCHITECTURES: dict[str, str] = {
    "3": "kepler",
    "5": "maxwell",
    "6": "pascal",
    "7.0": "volta",
    "7.2": "volta",
    "7.5": "turing",
    "8.0": "ampere",
    "8.6": "ampere",
    "8.7": "ampere",
    "8.9": "ada",
    "9": "hopper",
    "10": "blackwell",
    "11": "blackwell",
    "12": "blackwell",
}

# Last resort: marketing-name patterns -> architecture (first match wins).
NAME_ARCHITECTURES: tuple[tuple[str, str], ...] = (
    (r"\bG?B(10|100|200|300)\b|Blackwell|RTX 50\d\d", "blackwell"),
    (r"\bG?H(20|100|200|800)\b", "hopper"),
    (r"\bL(4|20|40S?)\b|RTX 40\d\d|\bAda\b", "ada"),
    (r"\bA(10G?|16|30|40|100|800)\b|RTX 30\d\d|RTX A\d{4}", "ampere"),
    (r"\bT4\b|RTX 20\d\d|GTX 16\d\d|Quadro RTX", "turing"),
    (r"\bV100\b|TITAN V\b", "volta"),
)


def architecture_name(
    arch: int | None, compute_capability: str | None = None, gpu_name: str | None = None
) -> str | None:
    """NVML enum first, then compute capability, then the marketing name; None if all fail."""
    if arch is not None and arch in ARCHITECTURES:
        return ARCHITECTURES[arch]
    if compute_capability:
        found = CC_ARCHITECTURES.get(compute_capability) or CC_ARCHITECTURES.get(
            compute_capability.split(".")[0]
        )
        if found:
            return found
    if gpu_name:
        for pattern, name in NAME_ARCHITECTURES:
            if re.search(pattern, gpu_name):
                return name
    return None


def cuda_version_text(version: int | None) -> str | None:
    """NVML encodes CUDA 13.0 as 13000 and 12.8 as 12080."""
    if not version:
        return None
    return f"{version // 1000}.{(version % 1000) // 10}"
