"""hardware.telemetry against a fake NVML that raises pynvml's real exceptions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pynvml
import pytest

from hardware.host import detect_host_class, read_meminfo, read_product_name
from hardware.nvml import architecture_name, cuda_version_text, decode_clock_reasons, query
from hardware.snapshot import GpuInfo, HostClass, HostSnapshot, XidEvent
from hardware.telemetry import collect
from tests.fakes.fake_nvml import (
    GB10,
    H100_80GB_HBM3_SXM,
    RTX_4090,
    FakeNVML,
    gb10_host,
    h100_host,
    no_driver_host,
    no_library_host,
    not_supported,
    nvml_error,
    rtx4090_host,
)

# 128 GiB-class box: 130_719_744 kB = 127_656 MiB total, 117_187 MiB available.
MEMINFO = """\
MemTotal:       130719744 kB
MemFree:        100000000 kB
MemAvailable:   120000000 kB
Buffers:          123456 kB
"""


def make_root(tmp_path: Path, *, product: str | None = None, model: bytes | None = None) -> Path:
    """A fake / with proc/meminfo and, optionally, a DMI product name or device-tree model."""
    (tmp_path / "proc").mkdir(parents=True)
    (tmp_path / "proc/meminfo").write_text(MEMINFO)
    if product is not None:
        dmi = tmp_path / "sys/class/dmi/id"
        dmi.mkdir(parents=True)
        (dmi / "product_name").write_text(product + "\n")
    if model is not None:
        (tmp_path / "proc/device-tree").mkdir()
        (tmp_path / "proc/device-tree/model").write_bytes(model)
    return tmp_path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_root(tmp_path)


def with_field(spec: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {**spec, **fields}


# -- full hosts ---------------------------------------------------------------------------------


def test_h100_every_field(root: Path) -> None:
    nvml = h100_host()
    snap = collect(nvml, root)

    assert snap.host_class is HostClass.DATACENTER
    assert snap.driver_version == "580.95.05"
    assert snap.cuda_driver_version == "13.0"
    assert snap.nvml_error is None
    assert (snap.memory_total_mib, snap.memory_available_mib) == (127656, 117187)
    assert snap.cpu_count >= 1
    assert snap.gpus == [
        GpuInfo(
            index=0,
            name="NVIDIA H100 80GB HBM3",
            uuid="GPU-5a3b1c2d-0e4f-4a5b-8c6d-7e8f9a0b1c2d",
            compute_capability="9.0",
            architecture="hopper",
            unified_memory=False,
            memory_total_mib=81559,
            memory_used_mib=524,
            memory_free_mib=81035,
            utilization_gpu_pct=37,
            utilization_memory_pct=12,
            temperature_c=41,
            power_draw_w=312.456,
            power_limit_w=700.0,
            clock_sm_mhz=1980,
            clock_memory_mhz=2619,
            throttle_reasons=["sw_power_cap"],
            ecc_enabled=True,
            ecc_uncorrected_errors=0,
            mig_enabled=False,
            xid_events=[XidEvent(xid=13)],
        )
    ]
    # Every field is known: nothing was left None.
    assert all(v is not None for v in snap.gpus[0].model_dump().values())
    # One init, one shutdown, every event set freed.
    assert (nvml.init_calls, nvml.shutdown_calls) == (1, 1)
    assert nvml.event_sets and all(s.freed for s in nvml.event_sets)


def test_gb10_unified_memory_from_proc_meminfo(root: Path) -> None:
    snap = collect(gb10_host(), root)

    gpu = snap.gpus[0]
    assert snap.host_class is HostClass.DGX_SPARK  # by GPU name alone: no DMI file here
    assert snap.product_name is None
    assert gpu.unified_memory is True
    assert (gpu.memory_total_mib, gpu.memory_free_mib, gpu.memory_used_mib) == (
        127656,
        117187,
        127656 - 117187,
    )
    assert gpu.compute_capability == "12.1"
    assert gpu.cc_tuple == (12, 1)
    assert gpu.architecture == "blackwell"
    # NotSupported on GB10 -> None, never 0.
    assert gpu.power_limit_w is None
    assert gpu.clock_memory_mhz is None
    assert gpu.ecc_enabled is None
    assert gpu.ecc_uncorrected_errors is None
    assert gpu.mig_enabled is None
    # Supported ones are still there.
    assert gpu.power_draw_w == 11.25
    assert gpu.clock_sm_mhz == 2405
    assert gpu.throttle_reasons == ["gpu_idle"]
    assert gpu.xid_events == []


def test_dgx_spark_by_dmi_product_name(tmp_path: Path) -> None:
    root = make_root(tmp_path, product="NVIDIA DGX Spark")
    snap = collect(gb10_host(), root)
    assert snap.product_name == "NVIDIA DGX Spark"
    assert snap.host_class is HostClass.DGX_SPARK


def test_dgx_spark_by_product_even_with_an_unfamiliar_gpu_name(tmp_path: Path) -> None:
    # A driver that does not know the marketing name yet still yields a Spark with unified memory.
    root = make_root(tmp_path, product="NVIDIA DGX Spark")
    snap = collect(FakeNVML([with_field(GB10, name="NVIDIA Graphics Device")]), root)
    assert snap.host_class is HostClass.DGX_SPARK
    assert snap.gpus[0].unified_memory is True
    assert snap.gpus[0].memory_total_mib == 127656


def test_rtx_4090_has_no_ecc_or_mig(root: Path) -> None:
    snap = collect(rtx4090_host(), root)
    gpu = snap.gpus[0]
    assert snap.host_class is HostClass.RTX
    assert gpu.ecc_enabled is None
    assert gpu.ecc_uncorrected_errors is None
    assert gpu.mig_enabled is None
    assert (gpu.compute_capability, gpu.architecture) == ("8.9", "ada")
    assert (gpu.memory_total_mib, gpu.memory_free_mib) == (24564, 23330)
    assert gpu.unified_memory is False
    assert gpu.power_limit_w == 450.0


@pytest.mark.parametrize(
    ("nvml", "reason"),
    [(no_driver_host(), "driver not loaded"), (no_library_host(), "libnvidia-ml.so.1")],
    ids=["no-driver", "no-library"],
)
def test_no_driver_is_cpu_only(root: Path, nvml: FakeNVML, reason: str) -> None:
    snap = collect(nvml, root)
    assert snap.host_class is HostClass.CPU_ONLY
    assert snap.nvml_error is not None and reason in snap.nvml_error
    assert snap.gpus == []
    assert snap.memory_total_mib == 127656
    assert nvml.shutdown_calls == 0  # no shutdown without a successful init


def test_init_oserror_is_cpu_only(root: Path) -> None:
    class Broken(FakeNVML):
        def nvmlInit(self) -> None:
            raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    snap = collect(Broken(), root)
    assert snap.host_class is HostClass.CPU_ONLY
    assert snap.nvml_error is not None and "cannot open shared object" in snap.nvml_error


def test_dgx_spark_without_a_driver_is_cpu_only(tmp_path: Path) -> None:
    root = make_root(tmp_path, product="NVIDIA DGX Spark")
    snap = collect(no_driver_host(), root)
    assert snap.host_class is HostClass.CPU_ONLY
    assert snap.product_name == "NVIDIA DGX Spark"  # kept, so doctor can say what is missing


def test_driver_without_gpus(root: Path) -> None:
    nvml = FakeNVML([])
    snap = collect(nvml, root)
    assert snap.host_class is HostClass.CPU_ONLY
    assert snap.nvml_error is not None
    assert snap.driver_version == "580.95.05"
    assert nvml.shutdown_calls == 1


# -- one field failing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [
        pynvml.NVML_ERROR_UNKNOWN,
        pynvml.NVML_ERROR_NO_PERMISSION,
        pynvml.NVML_ERROR_GPU_IS_LOST,
        pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
    ],
)
def test_one_failing_field_still_yields_a_snapshot(root: Path, code: int) -> None:
    snap = collect(FakeNVML([with_field(H100_80GB_HBM3_SXM, temperature=nvml_error(code))]), root)
    gpu = snap.gpus[0]
    assert gpu.temperature_c is None
    assert gpu.memory_total_mib == 81559
    assert gpu.power_draw_w == 312.456


def test_unknown_error_on_memory_of_a_discrete_gpu_is_none(root: Path) -> None:
    nvml = FakeNVML([with_field(H100_80GB_HBM3_SXM, memory=nvml_error(pynvml.NVML_ERROR_UNKNOWN))])
    gpu = collect(nvml, root).gpus[0]
    assert gpu.unified_memory is False
    assert gpu.memory_total_mib is None  # never the host's RAM for a discrete card


def test_every_field_failing_still_yields_the_gpu(root: Path) -> None:
    broken = {key: nvml_error(pynvml.NVML_ERROR_UNKNOWN) for key in H100_80GB_HBM3_SXM}
    snap = collect(FakeNVML([broken, RTX_4090]), root)
    assert [g.index for g in snap.gpus] == [0, 1]
    assert snap.gpus[0].name == "NVIDIA GPU 0"
    assert snap.gpus[0].xid_events is None
    assert snap.gpus[1].name == "NVIDIA GeForce RTX 4090"
    assert snap.host_class is HostClass.RTX


def test_lost_gpu_handle_is_skipped(root: Path) -> None:
    class LostFirst(FakeNVML):
        def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
            if index == 0:
                raise nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)
            return super().nvmlDeviceGetHandleByIndex(index)

    nvml = LostFirst([H100_80GB_HBM3_SXM, H100_80GB_HBM3_SXM])
    snap = collect(nvml, root)
    assert [g.index for g in snap.gpus] == [1]
    assert nvml.shutdown_calls == 1


def test_shutdown_error_does_not_crash(root: Path) -> None:
    class BadShutdown(FakeNVML):
        def nvmlShutdown(self) -> None:
            raise nvml_error(pynvml.NVML_ERROR_UNKNOWN)

    assert collect(BadShutdown([RTX_4090]), root).gpus


def test_old_bindings_bytes_are_decoded(root: Path) -> None:
    snap = collect(h100_host(bytes_strings=True), root)
    assert snap.driver_version == "580.95.05"
    assert snap.gpus[0].name == "NVIDIA H100 80GB HBM3"
    assert snap.gpus[0].uuid == "GPU-5a3b1c2d-0e4f-4a5b-8c6d-7e8f9a0b1c2d"


# -- throttle reasons ---------------------------------------------------------------------------


def test_decode_clock_reasons() -> None:
    assert decode_clock_reasons(None) is None
    assert decode_clock_reasons(0) == []
    assert decode_clock_reasons(0x1 | 0x40) == ["gpu_idle", "hw_thermal_slowdown"]
    assert decode_clock_reasons(0x1FF) == [
        "gpu_idle",
        "applications_clocks_setting",
        "sw_power_cap",
        "hw_slowdown",
        "sync_boost",
        "sw_thermal_slowdown",
        "hw_thermal_slowdown",
        "hw_power_brake_slowdown",
        "display_clock_setting",
    ]
    assert decode_clock_reasons(0x8 | 0x400) == ["hw_slowdown", "unknown_0x400"]


def test_throttle_reasons_fall_back_to_the_old_name(root: Path) -> None:
    class OldDriver(FakeNVML):
        def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any) -> int:
            raise nvml_error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)

    spec = with_field(RTX_4090, clock_event_reasons=0x20 | 0x4)
    gpu = collect(OldDriver([spec]), root).gpus[0]
    assert gpu.throttle_reasons == ["sw_power_cap", "sw_thermal_slowdown"]


def test_temperature_falls_back_to_the_deprecated_getter(root: Path) -> None:
    class OldDriver(FakeNVML):
        def nvmlDeviceGetTemperatureV(self, handle: Any, sensor: int) -> int:
            raise nvml_error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)

        def nvmlSystemGetCudaDriverVersion_v2(self) -> int:
            raise nvml_error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)

    snap = collect(OldDriver([RTX_4090], cuda_driver_version=12080), root)
    assert snap.gpus[0].temperature_c == 35
    assert snap.cuda_driver_version == "12.8"


# -- XID events ---------------------------------------------------------------------------------


def test_xid_event_collected_and_set_freed(root: Path) -> None:
    nvml = FakeNVML([RTX_4090, with_field(H100_80GB_HBM3_SXM, xid_events=[13, 48])])
    snap = collect(nvml, root)
    assert snap.gpus[0].xid_events == []
    assert [e.xid for e in snap.gpus[1].xid_events or []] == [13, 48]
    assert len(nvml.event_sets) == 2 and all(s.freed for s in nvml.event_sets)


def test_xid_not_supported_is_none(root: Path) -> None:
    nvml = FakeNVML([with_field(RTX_4090, xid_events=not_supported())])
    snap = collect(nvml, root)
    assert snap.gpus[0].xid_events is None
    assert all(s.freed for s in nvml.event_sets)  # freed even when registration failed


# -- round trip ---------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [h100_host, gb10_host, rtx4090_host, no_driver_host])
def test_snapshot_json_round_trip(root: Path, make: Any) -> None:
    snap = collect(make(), root)
    assert HostSnapshot.model_validate_json(snap.model_dump_json()) == snap


# -- host facts and tables ----------------------------------------------------------------------


def test_product_name_dmi_then_device_tree(tmp_path: Path) -> None:
    assert read_product_name(make_root(tmp_path / "a", model=b"NVIDIA DGX Spark\x00")) == (
        "NVIDIA DGX Spark"
    )
    both = make_root(tmp_path / "b", product="  ProLiant DL380 Gen11 ", model=b"board\x00")
    assert read_product_name(both) == "ProLiant DL380 Gen11"
    assert read_product_name(make_root(tmp_path / "c")) is None


def test_read_meminfo(tmp_path: Path) -> None:
    assert read_meminfo(make_root(tmp_path / "a")) == (127656, 117187)
    old = make_root(tmp_path / "b")
    (old / "proc/meminfo").write_text("MemTotal: 2048 kB\nMemFree: 1024 kB\n")
    assert read_meminfo(old) == (2, 1)  # no MemAvailable: fall back to MemFree
    assert read_meminfo(tmp_path / "missing") == (0, 0)


@pytest.mark.parametrize(
    ("product", "names", "expected"),
    [
        ("NVIDIA DGX Spark", ["NVIDIA Graphics Device"], HostClass.DGX_SPARK),
        (None, ["NVIDIA GB10"], HostClass.DGX_SPARK),
        (None, [], HostClass.CPU_ONLY),
        (None, ["NVIDIA H100 80GB HBM3"], HostClass.DATACENTER),
        (None, ["NVIDIA H200"], HostClass.DATACENTER),
        (None, ["NVIDIA H20"], HostClass.DATACENTER),
        (None, ["NVIDIA B200"], HostClass.DATACENTER),
        (None, ["NVIDIA GB200"], HostClass.DATACENTER),
        (None, ["NVIDIA A100-SXM4-80GB"], HostClass.DATACENTER),
        (None, ["NVIDIA A10"], HostClass.DATACENTER),
        (None, ["NVIDIA L40S"], HostClass.DATACENTER),
        (None, ["NVIDIA L4"], HostClass.DATACENTER),
        (None, ["NVIDIA GeForce RTX 4090"], HostClass.RTX),
        (None, ["NVIDIA RTX PRO 6000 Blackwell Workstation Edition"], HostClass.RTX),
        (None, ["NVIDIA RTX A1000"], HostClass.RTX),  # not an A10
        (None, ["NVIDIA RTX A4000"], HostClass.RTX),  # not an A40
        (None, ["NVIDIA RTX 6000 Ada Generation"], HostClass.RTX),
    ],
)
def test_detect_host_class(product: str | None, names: list[str], expected: HostClass) -> None:
    assert detect_host_class(product, names) is expected


def test_architecture_name_fallbacks() -> None:
    assert architecture_name(pynvml.NVML_DEVICE_ARCH_HOPPER) == "hopper"
    assert architecture_name(pynvml.NVML_DEVICE_ARCH_BLACKWELL) == "blackwell"
    assert architecture_name(pynvml.NVML_DEVICE_ARCH_UNKNOWN) is None
    assert architecture_name(None, "8.9") == "ada"
    assert architecture_name(12345, "12.1") == "blackwell"
    assert architecture_name(None, None, "NVIDIA H100 PCIe") == "hopper"
    assert architecture_name(None, None, "NVIDIA GeForce RTX 5090") == "blackwell"
    assert architecture_name(None, None, "Mystery Accelerator") is None


def test_cuda_version_text() -> None:
    assert cuda_version_text(13000) == "13.0"
    assert cuda_version_text(12080) == "12.8"
    assert cuda_version_text(None) is None


def test_query_default_and_missing_function() -> None:
    def unsupported() -> int:
        raise not_supported()

    assert query(unsupported) is None
    assert query(unsupported, default=0) == 0
    assert query(None, default="x") == "x"
    assert query(lambda a, b: a + b, 1, 2) == 3


def test_fake_uses_only_real_pynvml_names() -> None:
    # The fake must not drift from the real bindings, or telemetry would pass tests and fail live.
    fake_names = [n for n in dir(FakeNVML) if n.startswith(("nvml", "NVML_"))]
    assert fake_names
    assert [n for n in fake_names if not hasattr(pynvml, n)] == []
