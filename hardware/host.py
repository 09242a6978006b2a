"""Host facts outside NVML: product name, memory, and which class of box this is.

Every reader takes `root` so tests can point it at a fake tree under tmp_path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from hardware.snapshot import HostClass

# Where the product name lives: DMI on x86 and SBSA servers, the device tree on Arm boards.
PRODUCT_NAME_FILES: tuple[str, ...] = (
    "sys/class/dmi/id/product_name",
    "proc/device-tree/model",
)

DGX_SPARK_PRODUCT = "DGX Spark"
DGX_SPARK_GPU = "GB10"

# Datacenter GPU model tokens, matched as whole words in the NVML name ("NVIDIA H100 80GB HBM3").
DATACENTER_GPU_TOKENS: tuple[str, ...] = (
    "H100",
    "H200",
    "H800",
    "H20",
    "GH200",
    "B100",
    "B200",
    "B300",
    "GB200",
    "GB300",
    "A100",
    "A800",
    "A10",
    "A10G",
    "A30",
    "A40",
    "L4",
    "L20",
    "L40",
    "L40S",
    "T4",
    "V100",
)
_DATACENTER_RE = re.compile(
    r"(?<![A-Za-z0-9])(" + "|".join(DATACENTER_GPU_TOKENS) + r")(?![A-Za-z0-9])"
)


def _read_text(path: Path) -> str | None:
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    # The device-tree model is NUL-terminated; DMI ends in a newline.
    return raw.decode("utf-8", errors="replace").replace("\x00", "").strip() or None


def read_product_name(root: Path = Path("/")) -> str | None:
    """DMI product name, else the device-tree model, else None."""
    for rel in PRODUCT_NAME_FILES:
        value = _read_text(root / rel)
        if value:
            return value
    return None


def read_meminfo(root: Path = Path("/")) -> tuple[int, int]:
    """(MemTotal, MemAvailable) in MiB from proc/meminfo; (0, 0) if it cannot be read."""
    fields: dict[str, int] = {}
    text = _read_text(root / "proc/meminfo") or ""
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[key.strip()] = int(parts[0])  # kB
    total_kb = fields.get("MemTotal", 0)
    # Kernels before 3.14 have no MemAvailable; MemFree undercounts but is never optimistic.
    available_kb = fields.get("MemAvailable", fields.get("MemFree", 0))
    return total_kb // 1024, available_kb // 1024


def is_dgx_spark(product_name: str | None, gpu_names: Iterable[str] = ()) -> bool:
    if product_name and DGX_SPARK_PRODUCT.lower() in product_name.lower():
        return True
    return any(DGX_SPARK_GPU in name.upper() for name in gpu_names)


def is_datacenter_gpu(gpu_name: str) -> bool:
    return _DATACENTER_RE.search(gpu_name.upper()) is not None


def detect_host_class(product_name: str | None, gpu_names: Iterable[str]) -> HostClass:
    """DGX Spark by product or GB10; CPU-only without GPUs; datacenter by GPU model; else RTX."""
    names = list(gpu_names)
    if is_dgx_spark(product_name, names):
        return HostClass.DGX_SPARK
    if not names:
        return HostClass.CPU_ONLY
    if any(is_datacenter_gpu(name) for name in names):
        return HostClass.DATACENTER
    return HostClass.RTX
