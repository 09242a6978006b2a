"""Benchmark: streaming through the gateway (inference.local) versus straight to the backend.

Same run, interleaved rounds (direct, gateway, gateway, direct, ...) so machine noise hits both
alike; 1 and 32 concurrent streams. Prints tokens/s (gateway ÷ direct) and the p50 latency the
gateway adds, to the first token and to the last. Target: ratio >= 0.97, <= 1 ms added p50.

    .venv/bin/python tests/bench/bench_gateway.py [--rounds 6] [--tokens 64] [--delay 0.01]
        [--backend-url http://127.0.0.1:8000 --model NAME]   # an already running backend

Without --backend-url it starts the stand-in vLLM (tests/fakes/fake_vllm.py) with
FAKE_VLLM_TOKEN_DELAY=--delay. Not a test: run it by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.helpers import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from appliance.store.inference_store import InferenceStore
from tests.integration.gateway_harness import (
    start_fake_vllm,
    start_gateway,
    stop,
)


@dataclass
class Sample:
    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    tokens: int = 0
    wall: float = 0.0
    errors: int = 0


TOKEN_MARKS = (b'"delta": {"content"', b'"delta":{"content"')  # the role chunk starts with role


async def one(host: str, port: int, request: bytes, s: Sample) -> None:
    """One streamed request over a raw socket: a lean client, so the CPUs it would spend parsing
    go to the processes being measured (this box has two cores for all three)."""
    start = time.perf_counter()
    first = None
    tokens = 0
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(request)
        status = await reader.readline()
        if b" 200 " not in status:
            s.errors += 1
            writer.close()
            return
        while (await reader.readline()) not in (b"\r\n", b""):
            pass  # headers
        while True:  # chunked body: size line, data, CRLF
            size = int((await reader.readline()).strip() or b"0", 16)
            if size == 0:
                break
            data = await reader.readexactly(size + 2)
            n = sum(data.count(mark) for mark in TOKEN_MARKS)
            if n and first is None:
                first = time.perf_counter()
            tokens += n
        writer.close()
    except (OSError, ValueError, asyncio.IncompleteReadError):
        s.errors += 1
        return
    end = time.perf_counter()
    s.ttft.append((first or end) - start)
    s.latency.append(end - start)
    s.tokens += tokens


async def batch(base: str, secret: str | None, model: str, n: int, tokens: int, s: Sample) -> None:
    url = httpx.URL(base)
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "benchmark the gateway please"}],
            "max_tokens": tokens,
            "stream": True,
        }
    ).encode()
    auth = f"authorization: Bearer {secret}\r\n" if secret else ""
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {url.host}\r\n{auth}"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    ).encode() + body
    host, port = url.host, url.port or 80
    await one(host, port, request, Sample())  # warm
    start = time.perf_counter()
    await asyncio.gather(*(one(host, port, request, s) for _ in range(n)))
    s.wall += time.perf_counter() - start


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--delay", type=float, default=0.01)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--backend-url")
    ap.add_argument("--model", default="nemotron")
    args = ap.parse_args()

    state = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    backend = None
    if args.backend_url:
        backend_url = args.backend_url.rstrip("/")
    else:
        port = free_port()
        backend = start_fake_vllm(port, {"FAKE_VLLM_TOKEN_DELAY": str(args.delay)}, args.model)
        backend_url = f"http://127.0.0.1:{port}"
    store = InferenceStore(state)
    _, secret = store.create_key("bench", "client")
    gport = free_port()
    gateway = start_gateway(
        state, gport, {"backend_url": backend_url, "served_model_name": args.model}
    )
    gateway_url = f"http://127.0.0.1:{gport}"
    what = args.backend_url or f"stand-in vLLM, {args.delay * 1000:g} ms/token"
    print(f"backend: {what}; {args.tokens} tokens a stream; {args.rounds} rounds, interleaved")
    try:
        for conc in args.concurrency:
            direct, via = Sample(), Sample()
            gateway_cpu = backend_cpu = 0.0
            for r in range(args.rounds):
                order = [(backend_url, None, direct), (gateway_url, secret, via)]
                for base, key, sample in order if r % 2 == 0 else order[::-1]:
                    before = cpu_s(gateway.pid)
                    backend_before = cpu_s(backend.pid) if backend else 0.0
                    asyncio.run(batch(base, key, args.model, conc, args.tokens, sample))
                    if sample is via:
                        gateway_cpu += cpu_s(gateway.pid) - before
                    elif backend is not None:
                        backend_cpu += cpu_s(backend.pid) - backend_before
            d_tps, g_tps = direct.tokens / direct.wall, via.tokens / via.wall
            print(
                f"{conc:3d} streams: tok/s direct {d_tps:8.1f}  gateway {g_tps:8.1f}  "
                f"ratio {g_tps / d_tps:.3f} | p50 ttft {p50(direct.ttft) * 1000:7.2f} -> "
                f"{p50(via.ttft) * 1000:7.2f} ms (+{(p50(via.ttft) - p50(direct.ttft)) * 1000:.2f})"
                f" | p50 latency {p50(direct.latency) * 1000:7.1f} -> "
                f"{p50(via.latency) * 1000:7.1f} ms "
                f"(+{(p50(via.latency) - p50(direct.latency)) * 1000:.2f}) | gateway CPU "
                f"{gateway_cpu / max(via.tokens, 1) * 1e6:.0f} us/token (backend "
                f"{backend_cpu / max(direct.tokens, 1) * 1e6:.0f}) | errors "
                f"{direct.errors}/{via.errors}"
            )
    finally:
        stop(gateway)
        if backend is not None:
            stop(backend)
    rows = store.usage_totals()
    print(f"ledger: {rows['requests']} requests, {rows['completion_tokens']} completion tokens")


if __name__ == "__main__":
    main()
