"""Scrape-time collectors of the gateway's /metrics: the host's GPUs (hardware.telemetry) and an
info gauge naming each key, so a dashboard can show agents' names while every other series stays
labelled by key id.

Both read at scrape time and keep the answer for a short while: a scrape storm (several
Prometheus servers, a dashboard refreshing every second) costs one NVML snapshot or one key
listing per period, and the scrapes that arrive meanwhile wait for that one instead of starting
their own. A failing source yields no series, never a failed scrape.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hardware.snapshot import GpuInfo, HostSnapshot
from inference.ports import KeyStore

log = logging.getLogger(__name__)

T = TypeVar("T")
TelemetrySource = Callable[[], HostSnapshot]  # hardware.telemetry.collect, or a test's fake

GPU_TTL_S = 1.0
KEYS_TTL_S = 5.0  # a new key's name shows within this long
MIB = 1024 * 1024
GPU_LABELS = ("gpu", "uuid", "name")


class Cached(Generic[T]):
    """The last answer of `fetch`, fetched again once older than `ttl_s`. One fetch at a time:
    concurrent callers wait for it. A fetch that raises is logged and answers `empty` for the
    period (a broken driver is not retried on every scrape)."""

    def __init__(
        self,
        fetch: Callable[[], T],
        empty: T,
        ttl_s: float,
        what: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._empty = empty
        self._ttl_s = ttl_s
        self._what = what
        self._clock = clock
        self._lock = threading.Lock()
        self._value = empty
        self._at: float | None = None
        self._failing = False

    def get(self) -> T:
        with self._lock:
            now = self._clock()
            if self._at is not None and now - self._at < self._ttl_s:
                return self._value
            try:
                self._value = self._fetch()
                self._failing = False
            except Exception as exc:  # a scrape must not fail for a source that cannot answer
                if not self._failing:  # once per outage, not once per scrape
                    log.warning("metrics: cannot read %s: %s", self._what, exc)
                self._failing = True
                self._value = self._empty
            self._at = now
            return self._value


def _real_telemetry() -> HostSnapshot:
    from hardware.telemetry import collect  # lazily: pynvml only where a scrape needs it

    return collect()


class GpuCollector(Collector):
    """appliance_gpu_* gauges, one series per GPU (labels gpu index, uuid, name); none without a
    GPU. Unified-memory GPUs (GB10) report the host's memory, as telemetry does, labelled
    memory="unified"; a field the driver does not report is left out, never reported as 0."""

    def __init__(
        self,
        source: TelemetrySource | None = None,
        ttl_s: float = GPU_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._gpus: Cached[list[GpuInfo]] = Cached(
            lambda: list((source or _real_telemetry)().gpus), [], ttl_s, "GPU telemetry", clock
        )

    def describe(self) -> list[Metric]:
        # Without it the registry would collect() (and so read NVML) when registering.
        return list(_gpu_families([], keep_empty=True))

    def collect(self) -> Iterator[Metric]:
        return _gpu_families(self._gpus.get())


def _gpu_families(gpus: list[GpuInfo], keep_empty: bool = False) -> Iterator[Metric]:
    p = "appliance_gpu_"
    memory_labels = [*GPU_LABELS, "memory"]
    used = GaugeMetricFamily(p + "memory_used_bytes", "GPU memory in use", labels=memory_labels)
    total = GaugeMetricFamily(p + "memory_total_bytes", "GPU memory", labels=memory_labels)
    util = GaugeMetricFamily(
        p + "utilization_ratio", "GPU busy time over the last sample period", labels=GPU_LABELS
    )
    temp = GaugeMetricFamily(p + "temperature_celsius", "GPU core temperature", labels=GPU_LABELS)
    power = GaugeMetricFamily(p + "power_watts", "GPU power draw", labels=GPU_LABELS)
    limit = GaugeMetricFamily(
        p + "power_limit_watts", "GPU enforced power limit", labels=GPU_LABELS
    )
    throttle = GaugeMetricFamily(
        p + "throttle",
        "1 for each clock event (throttle) reason active now",
        labels=[*GPU_LABELS, "reason"],
    )
    for gpu in gpus:
        ids = [str(gpu.index), gpu.uuid or "", gpu.name]
        kind = "unified" if gpu.unified_memory else "dedicated"
        _add(used, [*ids, kind], gpu.memory_used_mib, MIB)
        _add(total, [*ids, kind], gpu.memory_total_mib, MIB)
        _add(util, ids, gpu.utilization_gpu_pct, 0.01)
        _add(temp, ids, gpu.temperature_c)
        _add(power, ids, gpu.power_draw_w)
        _add(limit, ids, gpu.power_limit_w)
        for reason in gpu.throttle_reasons or ():
            throttle.add_metric([*ids, reason], 1)
    for family in (used, total, util, temp, power, limit, throttle):
        if family.samples or keep_empty:
            yield family


def _add(
    family: GaugeMetricFamily, labels: list[str], value: float | None, scale: float = 1
) -> None:
    if value is not None:
        family.add_metric(labels, value * scale)


class KeyInfoCollector(Collector):
    """appliance_key_info{key, name, owner_kind} 1 for every key the gateway's store holds
    (revoked ones too: their counters live on until the gateway restarts). Join it on `key` to
    show names: `... * on(key) group_left(name) appliance_key_info`."""

    def __init__(
        self,
        keys: KeyStore,
        ttl_s: float = KEYS_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rows: Cached[list[tuple[str, str, str]]] = Cached(
            lambda: [(k.id, k.name, k.owner_kind) for k in keys.list_keys()],
            [],
            ttl_s,
            "the key store",
            clock,
        )

    def describe(self) -> list[Metric]:
        return [self._family([])]

    def collect(self) -> Iterator[Metric]:
        yield self._family(self._rows.get())

    @staticmethod
    def _family(rows: list[tuple[str, str, str]]) -> GaugeMetricFamily:
        info = GaugeMetricFamily(
            "appliance_key_info",
            "1 per API key: its id (the `key` label of other series), name and owner kind",
            labels=["key", "name", "owner_kind"],
        )
        for row in rows:
            info.add_metric(list(row), 1)
        return info
