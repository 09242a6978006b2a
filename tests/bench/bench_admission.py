"""Benchmark: what admission with reservations costs on the gateway's hot path.

One run, interleaved rounds, short non-streamed requests (max_tokens 1, a stand-in vLLM that
answers at once), so the gateway's own work dominates:

- direct to the backend (the floor),
- through the gateway with a key that has no budget (admission still writes the open row),
- through the gateway with a key that has a daily budget (the grant math too),
- optionally through a gateway built from an older tree (--baseline-tree DIR, e.g. the commit
  before reservations: `git archive <commit> | tar -x -C DIR`), its key with the same budget.

Also times Ledger.reserve + settle in-process (the SQLite transaction admission waits on).

    .venv/bin/python tests/bench/bench_admission.py [--rounds 6] [--requests 200]
        [--concurrency 1 16] [--baseline-tree DIR]

Not a test: run it by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from appliance.store.inference_store import InferenceStore
from inference.ports import Budget, Reservation, Settlement
from tests.integration.gateway_harness import (
    start_fake_vllm,
    start_gateway,
    stop,
    wait_http,
)


@dataclass
class Sample:
    latency: list[float] = field(default_factory=list)
    wall: float = 0.0
    done: int = 0
    errors: int = 0


async def worker(port: int, request: bytes, n: int, s: Sample) -> None:
    """n requests on one keep-alive connection, read lean (the client shares the two cores)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(n):
            start = time.perf_counter()
            writer.write(request)
            status = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            if b" 200 " in status:
                s.latency.append(time.perf_counter() - start)
                s.done += 1
            else:
                s.errors += 1
    finally:
        writer.close()


async def batch(port: int, secret: str | None, total: int, conc: int, s: Sample) -> None:
    body = json.dumps(
        {
            "model": "nemotron",
            "messages": [{"role": "user", "content": "measure admission"}],
            "max_tokens": 1,
        }
    ).encode()
    auth = f"authorization: Bearer {secret}\r\n" if secret else ""
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n{auth}"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode() + body
    start = time.perf_counter()
    await asyncio.gather(*(worker(port, request, total // conc, s) for _ in range(conc)))
    s.wall += time.perf_counter() - start


def start_baseline(tree: Path, state: Path, port: int, backend_url: str) -> subprocess.Popen:
    settings = json.dumps({"backend_url": backend_url})
    argv = [sys.executable, "-m", "tests.integration.gateway_harness", "--state-dir", str(state),
            "--port", str(port), "--settings", settings]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.Popen(argv, cwd=tree, env=env)
    wait_http(f"http://127.0.0.1:{port}/health/live", proc)
    return proc


def baseline_key(tree: Path, state: Path) -> str:
    """A key (with the same budget) made by the old tree's own store code."""
    code = (
        "import sys; from pathlib import Path; "
        "from appliance.store.inference_store import InferenceStore; "
        "from inference.ports import Budget; s = InferenceStore(Path(sys.argv[1])); "
        "k, secret = s.create_key('bench-old', 'client'); "
        "s.set_budget(Budget(k.id, daily_tokens=10**12)); print(secret)"
    )
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", code, str(state)], cwd=tree, env=env,
                         check=True, capture_output=True, text=True)  # fmt: skip
    return out.stdout.strip().splitlines()[-1]


def reserve_us(store: InferenceStore, n: int = 2000) -> tuple[float, float]:
    """Microseconds per Ledger.reserve and per settle, in steady state (8 requests in flight:
    each reservation is settled 8 admissions later)."""
    now = time.time()
    held = 8
    reserve = settle = 0.0
    for i in range(n + held):
        if i < n:
            start = time.perf_counter()
            store.reserve("bench-key", now, lambda s, r, i=i: Reservation(
                f"b{i}", "bench-key", "m", False, 100, 100, 0.0, now, "1:1"))  # fmt: skip
            reserve += time.perf_counter() - start
        if i >= held:
            start = time.perf_counter()
            done = Settlement(f"b{i - held}", "bench-key", "m", 1, 1, 0.0, 0.0, 200, "ok", now)
            store.settle([done])
            settle += time.perf_counter() - start
    return reserve / n * 1e6, settle / n * 1e6


def p50(values: list[float]) -> float:
    return statistics.median(values) * 1000 if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--requests", type=int, default=200, help="per round and variant")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--baseline-tree", type=Path)
    args = ap.parse_args()

    state = Path(tempfile.mkdtemp(prefix="bench-admission-"))
    bport = free_port()
    backend = start_fake_vllm(bport)
    backend_url = f"http://127.0.0.1:{bport}"
    store = InferenceStore(state)
    _, free_secret = store.create_key("bench-free", "client")
    budgeted, budget_secret = store.create_key("bench-budget", "client")
    store.set_budget(Budget(budgeted.id, daily_tokens=10**12))
    gport = free_port()
    gateway = start_gateway(state, gport, {"backend_url": backend_url})
    variants = [
        ("direct", bport, None),
        ("gateway, no budget", gport, free_secret),
        ("gateway, budget", gport, budget_secret),
    ]
    old = None
    if args.baseline_tree:
        old_state = Path(tempfile.mkdtemp(prefix="bench-admission-old-"))
        old_secret = baseline_key(args.baseline_tree, old_state)
        oport = free_port()
        old = start_baseline(args.baseline_tree, old_state, oport, backend_url)
        variants.append(("baseline tree, budget", oport, old_secret))
    try:
        rs, st = reserve_us(InferenceStore(Path(tempfile.mkdtemp(prefix="bench-reserve-"))))
        print(f"Ledger.reserve {rs:.0f} us, settle {st:.0f} us (one row a transaction)")
        for conc in args.concurrency:
            samples = {name: Sample() for name, _, _ in variants}
            for r in range(args.rounds):
                order = variants if r % 2 == 0 else variants[::-1]
                for name, port, secret in order:
                    asyncio.run(batch(port, secret, args.requests, conc, samples[name]))
            for name, _, _ in variants:
                s = samples[name]
                print(
                    f"{conc:3d} concurrent | {name:22s} {s.done / s.wall:7.1f} req/s  "
                    f"p50 {p50(s.latency):6.2f} ms  errors {s.errors}"
                )
    finally:
        stop(gateway)
        if old is not None:
            stop(old)
        stop(backend)
    rows = store.ledger_entries()
    states = {st: sum(1 for r in rows if r["state"] == st) for st in {r["state"] for r in rows}}
    print(f"ledger: {len(rows)} rows {states}")


if __name__ == "__main__":
    main()
