"""The Overview page, over the control plane's real app: the host class, each GPU's telemetry
(memory, unified memory as the host's, utilisation, temperature, power, throttle reasons), the
backend's and gateway's state and tokens/s, held requests linked to the approvals, agents; its
fragment refreshed in place; the status report gathered off the event loop, once for many
pollers (shared_read.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.console.render import duration, percent, since, size_mib, until
from appliance.console.shared_read import SharedRead
from tests.console_fixtures import Console, opened_console, report

GB10 = {"index": 0, "name": "NVIDIA GB10", "architecture": "blackwell", "unified_memory": True,
        "memory_total_mib": 122880, "memory_used_mib": 30720, "utilization_gpu_pct": 87,
        "utilization_memory_pct": 40, "temperature_c": 71, "power_draw_w": 48.25,
        "power_limit_w": 140.0, "throttle_reasons": ["sw_thermal", "hw_slowdown"],
        "memory_source": "host"}  # fmt: skip
H100 = {"index": 1, "name": "NVIDIA H100", "unified_memory": False, "memory_total_mib": 81559,
        "memory_used_mib": None, "utilization_gpu_pct": None, "temperature_c": None,
        "power_draw_w": None, "throttle_reasons": []}  # fmt: skip


@pytest.fixture
def console(tmp_path: Path) -> Iterator[Console]:
    yield from opened_console(tmp_path)


def _busy_report() -> dict[str, Any]:
    return report(
        host={"host_class": "dgx_spark", "cpu_count": 20, "memory_total_mib": 122880,
              "memory_available_mib": 92160, "driver_version": "580.1",
              "cuda_driver_version": "13.0"},
        gpus={"count": 2, "devices": [GB10, H100]},
        inference={"state": "ready", "plan": {"backend": "vllm", "served_model_name": "qwen"},
                   "metrics": {"requests_running": 2, "requests_waiting": 0,
                               "kv_cache_usage": 0.25,
                               "generation_rate": {"tokens_per_s": 41.5, "reason": None}}},
        budgets={"keys": [], "throughput": {"window_s": 60.0, "requests": 12,
                 "prompt_tokens_per_s": 10.5, "completion_tokens_per_s": 3.25}},
        approvals={"count": 1, "pending": [{"id": "ab12", "sandbox": "agent-1",
                   "host": "api.example.com", "port": 443, "waiting_s": 12.0}]},
        agents={"count": 1, "error": None, "agents": [{"name": "agent-1",
                "blueprint": "triage@1.2.0", "state": "running", "uptime_s": 3700,
                "tokens_today": 1200, "daily_budget": 50000, "pending_approvals": 1}]},
    )  # fmt: skip


def test_the_overview_shows_the_host_gpus_inference_and_agents(console: Console) -> None:
    console.plane.status = _busy_report  # type: ignore[method-assign]
    page = console.logged_in("ops-1").get("/").text
    for text in [
        "dgx_spark", "NVIDIA GB10", "(unified: the host's)", "30.0 GiB of 120.0 GiB (25%)",
        "87%", "71 °C", "48.2 W of 140 W", "sw_thermal, hw_slowdown",
        "vllm", "qwen", "41.5", "3.25 out", "12 requests", "KV cache 25%",
        'href="/approvals#a-ab12"', "agent-1 → api.example.com:443", "triage@1.2.0",
        "1 h 1 min", "1200 / 50000",
    ]:  # fmt: skip
        assert text in page, text
    h100 = page[page.index('id="gpu-1"') :]
    assert "Temperature</dt><dd>—" in h100
    assert 'Throttle reasons</dt><dd class="throttle">none' in h100
    assert '<meter min="0" max="100" value="25.0">' in page  # a bar without an inline style


def test_the_fragment_refreshes_in_place(console: Console) -> None:
    client = console.logged_in("ops-1")
    page = client.get("/").text
    assert 'data-refresh="/fragments/overview" data-every="2000"' in page
    fragment = client.get("/fragments/overview")
    assert fragment.status_code == 200
    assert "<html" not in fragment.text and "Held requests" in fragment.text


def test_the_status_report_is_gathered_off_the_event_loop(console: Console) -> None:
    threads: list[str] = []

    def gather() -> dict[str, Any]:
        threads.append(threading.current_thread().name)
        return report()

    console.plane.status = gather  # type: ignore[method-assign]
    console.logged_in("ops-1").get("/")
    assert threads and threads[0] != "MainThread"
    assert not any("asyncio" in t or "Loop" in t for t in threads)


def test_many_pollers_share_one_gathering() -> None:
    calls = 0

    def gather() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        time.sleep(0.2)  # a slow status: every poller waiting meanwhile gets this one
        return {"n": calls}

    async def poll() -> list[dict[str, Any]]:
        cache = SharedRead(max_age_s=1.0)
        return await asyncio.gather(*(cache.get(gather) for _ in range(20)))

    answers = asyncio.run(poll())
    assert calls == 1 and all(a == {"n": 1} for a in answers)


def test_the_cache_gathers_again_when_its_report_is_old_or_forgotten() -> None:
    now = [0.0]
    cache = SharedRead(max_age_s=1.0, clock=lambda: now[0])
    reports = iter(range(10))

    async def get() -> Any:
        return await cache.get(lambda: {"n": next(reports)})

    assert asyncio.run(get()) == {"n": 0}
    now[0] = 0.5
    assert asyncio.run(get()) == {"n": 0}
    now[0] = 1.6
    assert asyncio.run(get()) == {"n": 1}
    cache.forget()
    assert asyncio.run(get()) == {"n": 2}


def test_the_filters_never_show_an_unknown_as_zero() -> None:
    assert [duration(None), since(None), until(None), size_mib(None), percent(None)] == ["—"] * 5
    assert [duration(5), duration(75), duration(3700), duration(90000)] == [
        "5 s", "1 min 15 s", "1 h 1 min", "1 d 1 h"
    ]  # fmt: skip
    assert until(100.0, now=200.0) == "expired" and until(260.0, now=200.0) == "1 min"
    assert percent(30, 120) == "25%" and percent(0.25, 1) == "25%" and percent(1, 0) == "—"
    assert size_mib(1536) == "1.5 GiB" and percent(float("nan")) == "—"
