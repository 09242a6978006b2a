"""Benchmark: approvals and `sandbox create` through the control plane (real Podman, as root).

Starts a real `appliance serve control` on a temporary state dir and times
  - POST /api/v1/approvals/{id}/approve over the unix socket (httpx, one keep-alive client): a
    sandbox's agent keeps WORKERS requests to fresh unknown hosts held, so there is always one
    pending to approve; listing them is not timed;
  - `sandbox create` through the control plane (the CLI's typed client, POST /api/v1/sandboxes)
    beside a direct SandboxManager.create (appliance/control/wiring.py, in this process, on a
    state dir of its own), alternating, each followed by an untimed rm: the ratio is what the
    API, its locks and its second policy parse cost on top of the create itself (podman-py).
Prints median, p95 and max. Not a test: run it by hand as root,
`.venv/bin/python tests/bench/bench_control_sandbox.py [N_APPROVALS] [N_CREATES]` (100, 5).
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from appliance.config import load_config
from appliance.control.client import ControlClient
from appliance.control.wiring import sandbox_manager
from appliance.store import open_store
from sandbox.lifecycle.manager import read_policy_file
from tests.control_fixtures import control_socket, running_control_plane
from tests.helpers import cli_env
from tests.sandbox_fixtures import ensure_base_image, sandbox_skip_reason

POLICY = Path(__file__).resolve().parents[2] / "sandbox" / "policies" / "default.yaml"
WORKERS = 8  # held at once (a sandbox may hold at most 10 by default)
HELD_POLICY = POLICY.read_text().replace("hold_seconds: 30", "hold_seconds: 600")

# Each worker asks for a fresh host, waits for the operator's verdict, and asks again.
AGENT = r"""
import http.client, itertools, threading, time
counter = itertools.count()
def work():
    while True:
        host = f"h{next(counter)}.bench.test"
        try:
            c = http.client.HTTPConnection("127.0.0.1", 3128, timeout=900)
            c.request("GET", f"http://{host}/")
            c.getresponse().read()
        except Exception:
            time.sleep(0.05)
for _ in range(WORKERS):
    threading.Thread(target=work, daemon=True).start()
time.sleep(10**6)
""".replace("WORKERS", str(WORKERS))


def row(name: str, samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    med, top = statistics.median(ordered), ordered[-1]
    return f"{name:52} {len(ordered):5} {med * 1e3:9.1f} {p95 * 1e3:9.1f} {top * 1e3:9.1f}"


def approvals(api: httpx.Client, box: str, n: int) -> list[float]:
    samples: list[float] = []
    while len(samples) < n:
        pending = [p for p in api.get("/approvals").json() if p["sandbox"] == box]
        if not pending:
            time.sleep(0.02)
            continue
        start = time.perf_counter()
        answer = api.post(f"/approvals/{pending[0]['id']}/approve", json={"persist": False})
        samples.append(time.perf_counter() - start)
        answer.raise_for_status()
    return samples


def creates(config_env: dict[str, str], direct_root: Path, n: int) -> dict[str, list[float]]:
    policy = read_policy_file(POLICY)
    text = POLICY.read_text()
    direct_config = load_config({"state_dir": str(direct_root)})
    out: dict[str, list[float]] = {"api": [], "direct": []}
    with ControlClient(load_config(environ=config_env)) as client, open_store(direct_root) as db:
        manager = sandbox_manager(direct_config, db)
        for i in range(n):
            for how in ("api", "direct"):
                name = f"bench-{how}-{i}"
                start = time.perf_counter()
                if how == "api":
                    client.create_sandbox(name, text, str(POLICY))
                else:
                    manager.create(name, policy, None)
                out[how].append(time.perf_counter() - start)
                if how == "api":
                    client.remove_sandbox(name)
                else:
                    manager.remove(name)
    return out


def main(n_approvals: int, n_creates: int) -> None:
    if (why := sandbox_skip_reason()) is not None:
        sys.exit(f"cannot run: {why}")
    ensure_base_image()
    root = Path(tempfile.mkdtemp(prefix="bcs-"))  # short: unix socket paths live under it
    state, direct = root / "s", root / "d"
    env = cli_env(state, root)
    box = "bench-held"
    results: dict[str, list[float]] = {}
    try:
        with running_control_plane(env, state):
            with ControlClient(load_config(environ=env)) as client:
                client.create_sandbox(box, HELD_POLICY, "held.yaml", ["python3", "-I", "-c", AGENT])
            transport = httpx.HTTPTransport(uds=str(control_socket(state)))
            with httpx.Client(
                transport=transport, base_url="http://control/api/v1", timeout=60
            ) as api:
                approvals(api, box, 3)  # warm
                results["POST /approvals/{id}/approve (httpx, unix socket)"] = approvals(
                    api, box, n_approvals
                )
                api.delete(f"/sandboxes/{box}")
            timed = creates(env, direct, n_creates)
            results["sandbox create via the control plane (API)"] = timed["api"]
            results["sandbox create, direct SandboxManager"] = timed["direct"]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{'call':52} {'n':>5} {'median ms':>9} {'p95 ms':>9} {'max ms':>9}")
    for name, samples in results.items():
        print(row(name, samples))
    ratio = statistics.median(timed["api"]) / statistics.median(timed["direct"])
    print(f"create through the control plane / direct (medians): {ratio:.2f}")


if __name__ == "__main__":
    main(
        int(sys.argv[1]) if len(sys.argv) > 1 else 100,
        int(sys.argv[2]) if len(sys.argv) > 2 else 5,
    )
