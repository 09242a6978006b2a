"""hardware.telemetry with the real pynvml on this machine (with or without a driver)."""

from __future__ import annotations

import pynvml
import pytest

from hardware.snapshot import HostClass
from hardware.telemetry import collect


def _nvml_works() -> bool:
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError):
        return False
    pynvml.nvmlShutdown()
    return True


@pytest.mark.integration
def test_collect_on_this_machine() -> None:
    snap = collect()  # must never raise, driver or not
    assert snap.memory_total_mib > 0
    assert snap.memory_available_mib > 0
    assert snap.cpu_count >= 1
    if snap.gpus:
        assert snap.host_class is not HostClass.CPU_ONLY
        assert all(g.name for g in snap.gpus)
        assert snap.driver_version
    else:
        assert snap.host_class is HostClass.CPU_ONLY
        assert snap.nvml_error


@pytest.mark.integration
@pytest.mark.gpu
def test_collect_on_a_real_gpu() -> None:
    if not _nvml_works():
        pytest.skip("no usable NVIDIA driver here (nvmlInit fails)")
    snap = collect()
    assert snap.gpus, snap.nvml_error
    assert snap.driver_version and snap.cuda_driver_version
    for gpu in snap.gpus:
        assert gpu.name and gpu.uuid and gpu.uuid.startswith(("GPU-", "MIG-"))
        assert gpu.compute_capability and gpu.cc_tuple
        assert gpu.memory_total_mib and gpu.memory_total_mib > 0
        assert gpu.architecture is not None
