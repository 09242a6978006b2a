"""Benchmark: the control plane's API round trip, and `appliance status` with one running.

Starts a real `appliance serve control` on a temporary state dir, then times
  - GET /api/v1/status over the unix socket with one keep-alive httpx client (the raw round trip),
  - the same call through the CLI's typed client (appliance/control/client.py), one client,
  - GET /api/v1/openapi.json over the socket (the API's floor: no store, no status gathering),
  - `appliance status --json` and `appliance status` as subprocesses (must stay under 1 s),
and prints median, p95 and max of each. Not a test: run it by hand,
`.venv/bin/python tests/bench/bench_control.py [N]` (N round trips per call, default 200).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from appliance.config import load_config
from appliance.control.client import ControlClient
from tests.control_fixtures import control_socket, running_control_plane
from tests.helpers import cli_env

APPLIANCE = str(Path(sys.executable).parent / "appliance")
CLI_RUNS = 15  # subprocesses are slow: fewer of them


def timed(call: Callable[[], object], n: int) -> list[float]:
    call()  # warm: the first status builds caches, the first openapi renders the schema
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return samples


def row(name: str, samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    med, top = statistics.median(ordered), ordered[-1]
    return f"{name:44} {len(ordered):5} {med * 1e3:9.2f} {p95 * 1e3:9.2f} {top * 1e3:9.2f}"


def main(n: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-control-") as tmp:
        root = Path(tmp)
        state = root / "state"
        env = cli_env(state, root)
        with running_control_plane(env, state):
            transport = httpx.HTTPTransport(uds=str(control_socket(state)))
            results: dict[str, list[float]] = {}
            with httpx.Client(transport=transport, base_url="http://control/api/v1") as raw:
                results["GET /api/v1/status (httpx, unix socket)"] = timed(
                    lambda: raw.get("/status").raise_for_status(), n
                )
                results["GET /api/v1/openapi.json (httpx, unix socket)"] = timed(
                    lambda: raw.get("/openapi.json").raise_for_status(), n
                )
            config = load_config(environ=env)
            with ControlClient(config) as client:
                results["ControlClient.status() (CLI's client)"] = timed(client.status, n)

            def cli(*args: str) -> Callable[[], object]:
                argv = [APPLIANCE, *args]
                return lambda: subprocess.run(argv, env=env, check=True, capture_output=True)

            results["`appliance status --json` (subprocess)"] = timed(
                cli("status", "--json"), CLI_RUNS
            )
            results["`appliance status` (subprocess)"] = timed(cli("status"), CLI_RUNS)
    print(f"{'call':44} {'n':>5} {'median ms':>9} {'p95 ms':>9} {'max ms':>9}")
    for name, samples in results.items():
        print(row(name, samples))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
