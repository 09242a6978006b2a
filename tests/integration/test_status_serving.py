"""`appliance status` while serving: each GPU's telemetry (tests/fakes/fake_nvml.py: a GB10 with
unified memory, a power-capped H100) next to vLLM's own figures, scraped from the stand-in vLLM
(tests/fakes/fake_vllm.py) as a real process with requests running; the tokens/s rate from two
scrapes or from the previous status call's; the backend's container when it runs in one."""

from __future__ import annotations

import contextlib
import copy
import http.server
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console
from rich.panel import Panel

from appliance.cli.status import render
from appliance.config import ApplianceConfig, InferenceConfig, ListenConfig
from appliance.ops import backend_metrics as bm
from appliance.ops.status import gather
from appliance.services import run_state
from appliance.services.supervisor import _StateFile, pid_file, run_dir, services_file
from hardware.planner import plan_serving
from hardware.snapshot import HostSnapshot
from hardware.telemetry import collect
from inference.backends.container import ContainerSpec
from inference.backends.process import ProcessBackend
from tests.conftest import REPO
from tests.fakes.fake_nvml import GB10, H100_80GB_HBM3_SXM, FakeNVML, not_supported
from tests.helpers import free_port

TOKEN_DELAY_S = 0.05  # the stand-in generates 20 tokens/s per request
MEMINFO = "MemTotal: 130719744 kB\nMemFree: 100000000 kB\nMemAvailable: 120000000 kB\n"


@pytest.fixture
def host(tmp_path: Path) -> HostSnapshot:
    """A GB10 (memory: the host's, from this fake /proc/meminfo) and a power-capped H100."""
    root = tmp_path / "root"
    (root / "proc").mkdir(parents=True)
    (root / "proc/meminfo").write_text(MEMINFO)
    return collect(FakeNVML([GB10, H100_80GB_HBM3_SXM]), root)


@pytest.fixture
def vllm(tmp_path: Path) -> Iterator[dict[str, Any]]:
    port = free_port()
    log = (tmp_path / "vllm.log").open("w")
    argv = ["serve", "nemotron", "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.fake_vllm", *argv],
        env={**os.environ, "PYTHONPATH": str(REPO), "FAKE_VLLM_TOKEN_DELAY": str(TOKEN_DELAY_S)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: _healthy(base), 30, "the stand-in vLLM to load")
    yield {"proc": proc, "port": port, "base": base}
    proc.kill()  # uvicorn's graceful stop would wait for the requests still streaming
    proc.wait(10)
    log.close()


def _healthy(base: str) -> bool:
    try:
        return httpx.get(base + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def config_for(tmp_path: Path, port: int) -> ApplianceConfig:
    listen = ListenConfig(port=port)
    return ApplianceConfig(
        state_dir=tmp_path / "state", inference=InferenceConfig(backend_listen=listen)
    )


def start_requests(base: str, count: int, tokens: int = 400) -> list[threading.Thread]:
    """`count` completions generating `tokens` tokens each, in the background (about 20 s)."""

    def one() -> None:
        body = {"model": "nemotron", "prompt": "a b c d", "max_tokens": tokens}
        with contextlib.suppress(httpx.HTTPError):  # the fixture stopped the server first
            httpx.post(base + "/v1/completions", json=body, timeout=60)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(count)]
    for t in threads:
        t.start()
    return threads


def running(base: str) -> tuple[float | None, float | None]:
    metrics = bm.scrape(base)
    assert metrics is not None
    return metrics.requests_running, metrics.requests_waiting


def screen(report: dict[str, Any], host: HostSnapshot) -> str:
    console = Console(width=220, record=True, color_system=None, file=io.StringIO())
    console.print(Panel(render(report, host), title="appliance status"))
    return console.export_text()


# -- the GPU panel and vLLM's figures ------------------------------------------------------------


def test_gpus_next_to_vllms_figures_with_requests_running(
    tmp_path: Path, host: HostSnapshot, vllm: dict[str, Any]
) -> None:
    start_requests(vllm["base"], 2)  # --max-num-seqs 1: one runs, one waits
    wait_until(lambda: running(vllm["base"]) == (1, 1), 20, "one running and one waiting")
    report = json.loads(json.dumps(gather(config_for(tmp_path, vllm["port"]), host)))

    gb10, h100 = report["gpus"]["devices"]
    assert gb10["unified_memory"] is True and gb10["memory_source"] == "host"
    # GB10: NVML has no memory figures; the host's /proc/meminfo is the GPU's memory.
    assert (gb10["memory_total_mib"], gb10["memory_used_mib"]) == (127656, 127656 - 117187)
    assert gb10["power_draw_w"] == 11.25 and gb10["power_limit_w"] is None  # unknown, not 0
    assert gb10["throttle_reasons"] == ["gpu_idle"]
    assert h100["memory_source"] == "device" and h100["memory_used_mib"] == 524
    assert (h100["utilization_gpu_pct"], h100["temperature_c"]) == (37, 41)
    assert (h100["power_draw_w"], h100["power_limit_w"]) == (312.456, 700.0)
    assert h100["throttle_reasons"] == ["sw_power_cap"]

    metrics = report["inference"]["metrics"]
    assert (metrics["requests_running"], metrics["requests_waiting"]) == (1, 1)
    assert 0 < metrics["kv_cache_usage"] <= 1
    rate = metrics["generation_rate"]
    # No previous scrape (no run dir): a second scrape SAMPLE_S later, while requests run.
    assert rate["method"] == "two_scrapes" and rate["reason"] is None
    assert rate["window_s"] == pytest.approx(bm.SAMPLE_S, abs=0.5)
    assert 5 < rate["tokens_per_s"] < 1.5 / TOKEN_DELAY_S, rate  # one request at ~20 tokens/s
    assert report["inference"]["container"] is None  # the venv path

    text = screen(report, host)
    assert "127656 MiB host memory (unified)" in text
    assert "sw_power_cap" in text and "gpu_idle" in text
    assert "11.2W/n/a" in text and "312.5W/700.0W" in text
    assert "requests running 1, waiting 1" in text
    assert f"tokens/s (last 1 s) {rate['tokens_per_s']:.1f}" in text
    kv = f"KV cache {metrics['kv_cache_usage']:.1%}"
    assert kv in text, text


def test_the_next_status_call_measures_since_the_previous_one_without_waiting(
    tmp_path: Path, host: HostSnapshot, vllm: dict[str, Any]
) -> None:
    config = config_for(tmp_path, vllm["port"])
    run_dir(config).mkdir(parents=True)  # what a supervisor has made
    start_requests(vllm["base"], 1)
    wait_until(lambda: running(vllm["base"])[0] == 1, 20, "a running request")
    first = gather(config, host)["inference"]["metrics"]["generation_rate"]
    assert first["method"] == "two_scrapes"
    time.sleep(0.5)
    started = time.monotonic()
    report = gather(config, host)
    took = time.monotonic() - started
    rate = report["inference"]["metrics"]["generation_rate"]
    assert rate["method"] == "previous_status", rate
    assert took < bm.SAMPLE_S, f"the second call waited for a sample: {took:.2f} s"
    assert 0.4 < rate["window_s"] < 5 and 5 < rate["tokens_per_s"] < 30, rate
    window = f"tokens/s (last {rate['window_s']:.0f} s, since the last status)"
    assert window in screen(report, host)


def test_idle_backend_has_no_rate_and_shows_no_made_up_zero(
    tmp_path: Path, host: HostSnapshot, vllm: dict[str, Any]
) -> None:
    report = gather(config_for(tmp_path, vllm["port"]), host)
    metrics = report["inference"]["metrics"]
    assert metrics["requests_running"] == 0  # the gauge says so: a known 0
    assert metrics["generation_rate"] == {
        "tokens_per_s": None,
        "window_s": None,
        "method": None,
        "reason": "no requests running",
    }
    assert "tokens/s n/a (no requests running)" in screen(report, host)


@pytest.mark.parametrize(
    "damage",
    [
        "{not json",
        json.dumps({"scraped_at": "soon", "generation_tokens": 1}),
        json.dumps({"scraped_at": 1e308, "generation_tokens": 0, "backend": None}),
        json.dumps({"scraped_at": float("nan"), "generation_tokens": 5}),
        "[]",
    ],
)
def test_a_damaged_or_foreign_previous_scrape_is_not_trusted(
    tmp_path: Path, host: HostSnapshot, vllm: dict[str, Any], damage: str
) -> None:
    config = config_for(tmp_path, vllm["port"])
    run_dir(config).mkdir(parents=True)
    (run_dir(config) / bm.SCRAPE_FILE).write_text(damage)
    start_requests(vllm["base"], 1)
    wait_until(lambda: running(vllm["base"])[0] == 1, 20, "a running request")
    rate = gather(config, host)["inference"]["metrics"]["generation_rate"]
    assert rate["method"] == "two_scrapes" and rate["tokens_per_s"] > 0, rate
    kept = json.loads((run_dir(config) / bm.SCRAPE_FILE).read_text())  # replaced by a good one
    assert kept["backend"] == {"endpoint": vllm["base"], "pid": None}


def test_status_calls_at_once_never_fail_and_leave_one_good_scrape(
    tmp_path: Path, host: HostSnapshot, vllm: dict[str, Any]
) -> None:
    config = config_for(tmp_path, vllm["port"])
    run_dir(config).mkdir(parents=True)
    start_requests(vllm["base"], 1)
    wait_until(lambda: running(vllm["base"])[0] == 1, 20, "a running request")
    rates: list[dict[str, Any]] = []

    def call() -> None:
        rates.append(gather(config, host)["inference"]["metrics"]["generation_rate"])

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(rates) == 6 and all(r["tokens_per_s"] is not None for r in rates), rates
    kept = json.loads((run_dir(config) / bm.SCRAPE_FILE).read_text())
    assert kept["generation_tokens"] > 0
    assert [p.name for p in run_dir(config).iterdir()] == [bm.SCRAPE_FILE]  # no temp left
    assert (run_dir(config) / bm.SCRAPE_FILE).stat().st_mode & 0o777 == 0o644


def test_another_backends_scrape_is_not_compared(
    tmp_path: Path, host: HostSnapshot, vllm: dict[str, Any]
) -> None:
    config = config_for(tmp_path, vllm["port"])
    run_dir(config).mkdir(parents=True)
    foreign = {"endpoint": vllm["base"], "pid": 1}  # a backend that since restarted
    record = {"backend": foreign, "scraped_at": time.time() - 2, "generation_tokens": 1e9}
    (run_dir(config) / bm.SCRAPE_FILE).write_text(json.dumps(record))
    rate = gather(config, host)["inference"]["metrics"]["generation_rate"]
    assert rate["tokens_per_s"] is None and rate["reason"] == "no requests running"


# -- the container path --------------------------------------------------------------------------


def test_the_container_path_shows_the_backends_container(
    tmp_path: Path, host: HostSnapshot, vllm: dict[str, Any]
) -> None:
    """services.json as the supervisor writes it for a backend in the appliance image; the
    backend (here the stand-in) listens on the same configured loopback address, so its figures
    read the same as on the venv path."""
    config = config_for(tmp_path, vllm["port"])
    run_dir(config).mkdir(parents=True)
    spec = ContainerSpec(
        image="localhost/appliance-spark:latest",
        name="appliance-backend-0123abcd",
        cache_volume="appliance-backend-cache-0123abcd",
    )
    backend = ProcessBackend(
        ["vllm", "serve", "nemotron"],
        base_url=vllm["base"],
        log_path=tmp_path / "backend.log",
        name="backend",
        container=spec,
    )
    states = _StateFile(services_file(config), plan_serving(host, port=vllm["port"]), "test")
    lock = run_state.hold_supervisor_lock(run_dir(config))  # this test plays the supervisor
    try:
        run_state.write_pid_file(pid_file(config), "test")
        states.update("backend", backend, "ready", "")
        start_requests(vllm["base"], 1)
        wait_until(lambda: running(vllm["base"])[0] == 1, 20, "a running request")
        report = gather(config, host)
    finally:
        os.close(lock)
    inference = report["inference"]
    assert inference["state"] == "ready"
    assert inference["container"] == {
        "name": "appliance-backend-0123abcd",
        "image": "localhost/appliance-spark:latest",
    }
    assert inference["metrics"]["requests_running"] == 1
    assert inference["metrics"]["generation_rate"]["tokens_per_s"] > 0
    text = screen(report, host)
    assert "container appliance-backend-0123abcd  (localhost/appliance-spark:latest)" in text


def test_the_supervisors_state_says_no_container_on_the_venv_path(
    tmp_path: Path, host: HostSnapshot
) -> None:
    config = config_for(tmp_path, free_port())
    run_dir(config).mkdir(parents=True)
    backend = ProcessBackend(["x"], base_url="http://127.0.0.1:1", log_path=tmp_path / "b.log")
    states = _StateFile(services_file(config), plan_serving(host), "test")
    states.update("backend", backend, "ready", "")
    assert json.loads(services_file(config).read_text())["backend"]["container"] is None


# -- nothing running, unknowns, and something else on the port ----------------------------------


def test_nothing_running_is_read_only_and_shows_no_metrics(tmp_path: Path) -> None:
    config = config_for(tmp_path, free_port())
    blank = copy.deepcopy(GB10)
    for key in ("utilization", "temperature", "power_usage_mw", "clock_event_reasons"):
        blank[key] = not_supported()
    root = tmp_path / "root"
    (root / "proc").mkdir(parents=True)
    (root / "proc/meminfo").write_text(MEMINFO)
    host = collect(FakeNVML([blank]), root)
    report = gather(config, host)
    assert report["inference"]["state"] == "down" and report["inference"]["metrics"] is None
    assert not config.state_dir.exists()  # status created nothing
    (gpu,) = report["gpus"]["devices"]
    assert gpu["utilization_gpu_pct"] is None and gpu["throttle_reasons"] is None
    text = screen(report, host)
    row = next(line for line in text.splitlines() if "GB10" in line)
    assert "n/a/n/a" in row and " 0%" not in row and "0W" not in row, row
    assert "requests running" not in text


class _Metrics(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serving(body: bytes) -> Iterator[int]:
    handler = type("Handler", (_Metrics,), {"body": body})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_something_else_on_the_backends_port_is_no_metrics(
    tmp_path: Path, host: HostSnapshot
) -> None:
    with serving(b"<html>not metrics</html>") as port:
        report = gather(config_for(tmp_path, port), host)
    assert report["inference"]["state"] == "listening"
    assert report["inference"]["metrics"] is None


def test_a_backend_that_exports_none_of_vllms_figures_shows_them_unknown(
    tmp_path: Path, host: HostSnapshot
) -> None:
    with serving(b"# HELP other_total x\n# TYPE other_total counter\nother_total 3\n") as port:
        report = gather(config_for(tmp_path, port), host)
    metrics = report["inference"]["metrics"]
    assert metrics["requests_running"] is None and metrics["kv_cache_usage"] is None
    assert metrics["generation_rate"]["reason"] == "not exported by the backend"
    text = screen(report, host)
    assert "requests running n/a, waiting n/a · KV cache n/a" in text
    assert "tokens/s n/a (not exported by the backend) · tokens in/out n/a/n/a" in text
