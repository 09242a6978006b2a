"""The gateway's scrape-time collectors (inference/gateway/collectors.py): GPU gauges from a
telemetry snapshot (values, units, throttle reasons, unified memory, fields the driver does not
report, no GPU, a failing source, the cache under a scrape storm) and appliance_key_info from a
real key store (hostile names, revoked keys, the cache)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from appliance.store.inference_store import InferenceStore
from hardware.snapshot import GpuInfo, HostClass, HostSnapshot
from inference.gateway.collectors import GpuCollector, KeyInfoCollector
from inference.gateway.metrics import GatewayMetrics
from inference.ports import KeyRecord

MIB = 1024 * 1024


def snapshot(*gpus: GpuInfo) -> HostSnapshot:
    host_class = HostClass.DATACENTER if gpus else HostClass.CPU_ONLY
    return HostSnapshot(
        host_class=host_class,
        cpu_count=8,
        memory_total_mib=65536,
        memory_available_mib=32768,
        gpus=list(gpus),
    )


H100 = GpuInfo(
    index=0,
    name="NVIDIA H100 80GB HBM3",
    uuid="GPU-aaaa",
    memory_total_mib=81559,
    memory_used_mib=524,
    utilization_gpu_pct=37,
    temperature_c=41,
    power_draw_w=312.5,
    power_limit_w=700.0,
    throttle_reasons=["sw_power_cap", "hw_thermal_slowdown"],
)
# GB10: memory is the host's (telemetry fills it from /proc/meminfo); no power limit reported.
GB10 = GpuInfo(
    index=1,
    name="NVIDIA GB10",
    uuid=None,
    unified_memory=True,
    memory_total_mib=122880,
    memory_used_mib=4096,
    utilization_gpu_pct=3,
    temperature_c=None,
    power_draw_w=11.25,
    power_limit_w=None,
    throttle_reasons=[],
)


class Source:
    """A telemetry source that counts its calls; optionally slow or failing."""

    def __init__(self, snap: HostSnapshot, delay: float = 0.0) -> None:
        self.snap = snap
        self.delay = delay
        self.calls = 0
        self.error: Exception | None = None

    def __call__(self) -> HostSnapshot:
        self.calls += 1
        time.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return self.snap


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def scrape(*collectors: object) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Register the collectors in a fresh registry and parse its text exposition."""
    registry = CollectorRegistry(auto_describe=True)
    for collector in collectors:
        registry.register(collector)  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    return {
        f.name: [(s.labels, s.value) for s in f.samples]
        for f in text_string_to_metric_families(text)
    }


def values(series: list[tuple[dict[str, str], float]], label: str) -> dict[str, float]:
    return {labels[label]: value for labels, value in series}


def test_gpu_gauges_carry_each_gpu_in_base_units() -> None:
    got = scrape(GpuCollector(Source(snapshot(H100, GB10))))
    ids = {"gpu": "0", "uuid": "GPU-aaaa", "name": "NVIDIA H100 80GB HBM3"}
    assert (ids | {"memory": "dedicated"}, 524 * MIB) in got["appliance_gpu_memory_used_bytes"]
    assert values(got["appliance_gpu_memory_total_bytes"], "memory") == {
        "dedicated": 81559 * MIB,
        "unified": 122880 * MIB,  # the host's memory, as telemetry reports it for a GB10
    }
    assert values(got["appliance_gpu_utilization_ratio"], "gpu") == {"0": 0.37, "1": 0.03}
    assert got["appliance_gpu_temperature_celsius"] == [(ids, 41)]  # GB10's: not reported
    assert values(got["appliance_gpu_power_watts"], "gpu") == {"0": 312.5, "1": 11.25}
    assert got["appliance_gpu_power_limit_watts"] == [(ids, 700.0)]
    assert sorted(got["appliance_gpu_throttle"], key=str) == [
        (ids | {"reason": "hw_thermal_slowdown"}, 1.0),
        (ids | {"reason": "sw_power_cap"}, 1.0),
    ]
    gb10 = [labels for labels, _ in got["appliance_gpu_power_watts"] if labels["gpu"] == "1"]
    assert gb10 == [{"gpu": "1", "uuid": "", "name": "NVIDIA GB10"}]


def test_no_gpu_no_series_and_no_error() -> None:
    source = Source(snapshot())
    assert not [name for name in scrape(GpuCollector(source)) if name.startswith("appliance_")]
    assert source.calls == 1


def test_a_failing_source_yields_no_series_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    source, clock = Source(snapshot(H100)), Clock()
    source.error = OSError("libnvidia-ml.so.1: cannot open shared object file")
    collector = GpuCollector(source, ttl_s=1.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="inference.gateway.collectors"):
        for _ in range(3):
            assert list(collector.collect()) == []
            clock.now += 2  # each scrape past the cache: the source is asked again
    assert source.calls == 3
    assert [r.getMessage() for r in caplog.records] == [
        "metrics: cannot read GPU telemetry: libnvidia-ml.so.1: cannot open shared object file"
    ]
    source.error = None  # the driver is back
    assert {m.name for m in collector.collect()} >= {"appliance_gpu_power_watts"}


def test_two_scrapes_within_the_period_read_the_gpus_once() -> None:
    source, clock = Source(snapshot(H100)), Clock()
    collector = GpuCollector(source, ttl_s=1.0, clock=clock)
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    assert source.calls == 0  # registering describes without reading NVML
    first = generate_latest(registry)
    clock.now += 0.5
    source.snap = snapshot(H100.model_copy(update={"temperature_c": 90}))
    assert generate_latest(registry) == first and source.calls == 1
    clock.now += 0.6
    assert b'appliance_gpu_temperature_celsius{gpu="0"' in generate_latest(registry)
    assert b"} 90.0" in generate_latest(registry) and source.calls == 2


def test_a_scrape_storm_reads_the_gpus_once() -> None:
    """Sixteen concurrent scrapes while one slow NVML read is under way: one read, one answer."""
    source = Source(snapshot(H100), delay=0.3)
    # A long period: a slow CI thread that starts late must still find the answer cached.
    registry = CollectorRegistry(auto_describe=True)
    registry.register(GpuCollector(source, ttl_s=60.0))
    start = threading.Barrier(16)
    answers: list[bytes] = []

    def scrape_once() -> None:
        start.wait()
        answers.append(generate_latest(registry))

    threads = [threading.Thread(target=scrape_once) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert source.calls == 1
    assert len(answers) == 16
    assert all(b'appliance_gpu_power_watts{gpu="0"' in a for a in answers)


# -- appliance_key_info --------------------------------------------------------------------

HOSTILE = 'ag"ent\\x\n} 1\nappliance_key_info{key="forged"'


@pytest.fixture
def store(tmp_path: Path) -> InferenceStore:
    with InferenceStore(tmp_path) as s:
        yield s  # type: ignore[misc]


def test_key_info_names_every_key_by_id(store: InferenceStore) -> None:
    agent, _ = store.create_key("researcher", "sandbox")
    client, _ = store.create_key("ci", "client", scopes=["metrics"])
    store.revoke_key("ci")  # its counters live on: its name still resolves
    got = scrape(KeyInfoCollector(store))["appliance_key_info"]
    assert sorted(got, key=lambda s: s[0]["key"]) == sorted(
        [
            ({"key": agent.id, "name": "researcher", "owner_kind": "sandbox"}, 1.0),
            ({"key": client.id, "name": "ci", "owner_kind": "client"}, 1.0),
        ],
        key=lambda s: s[0]["key"],
    )


class ListedKeys:
    """A key store answering list_keys only (the store itself refuses such names today; a
    row written before the name rule, or another KeyStore, may still hold one)."""

    def __init__(self, *keys: KeyRecord) -> None:
        self.keys = list(keys)

    def list_keys(self) -> list[KeyRecord]:
        return self.keys


def test_a_hostile_name_is_escaped_and_forges_no_series() -> None:
    hostile = KeyRecord("key_1", HOSTILE, "sandbox", created_at=0.0)
    got = scrape(KeyInfoCollector(ListedKeys(hostile)))  # type: ignore[arg-type]
    assert got["appliance_key_info"] == [
        ({"key": "key_1", "name": HOSTILE, "owner_kind": "sandbox"}, 1.0)
    ]
    gpu = H100.model_copy(update={"name": HOSTILE})
    got = scrape(GpuCollector(Source(snapshot(gpu))))
    assert values(got["appliance_gpu_power_watts"], "name") == {HOSTILE: 312.5}
    assert "appliance_key_info" not in got


def test_key_info_is_cached(store: InferenceStore) -> None:
    clock = Clock()
    calls: list[int] = []

    class CountingStore:
        def list_keys(self) -> list[KeyRecord]:
            calls.append(1)
            return store.list_keys()

    collector = KeyInfoCollector(CountingStore(), ttl_s=5.0, clock=clock)  # type: ignore[arg-type]

    def named() -> set[str]:
        [family] = collector.collect()
        return {sample.labels["name"] for sample in family.samples}

    store.create_key("first", "sandbox")
    assert named() == {"first"}
    store.create_key("second", "sandbox")
    clock.now += 4
    assert named() == {"first"} and len(calls) == 1
    clock.now += 2
    assert named() == {"first", "second"} and len(calls) == 2


def test_without_a_key_store_there_is_no_key_info() -> None:
    text = GatewayMetrics(telemetry=Source(snapshot())).render().decode()
    assert "appliance_key_info" not in text and "appliance_gpu_" not in text
    assert "appliance_gateway_requests_in_flight 0.0" in text
