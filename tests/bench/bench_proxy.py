"""Benchmark: the egress proxy versus going direct, on loopback.

1. Download of a ~50 MB body from a loopback origin: through the proxy's unix socket (absolute-form
   GET and a CONNECT tunnel) ÷ direct. Target >= 0.9.
2. Added connect latency: p50 of (unix connect + CONNECT + 200) minus p50 of a direct TCP connect,
   over 200 connects each, interleaved. Target <= 1 ms.

The origin and the proxy (`python -m sandbox.proxy`) run as their own processes, as in production.

    .venv/bin/python tests/bench/bench_proxy.py [--mb 50] [--rounds 5] [--connects 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

ORIGIN = r"""
import asyncio, sys
SIZE = int(sys.argv[1])
BLOCK = b"x" * (1024 * 1024)
async def handle(r, w):
    try:
        while True:
            head = await r.readuntil(b"\r\n\r\n")
            if head.startswith(b"PING"):
                continue
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % SIZE)
            left = SIZE
            while left:
                n = min(left, len(BLOCK)); w.write(BLOCK[:n]); left -= n
                await w.drain()
    except Exception:
        pass
    w.close()
async def main():
    s = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(s.sockets[0].getsockname()[1], flush=True)
    await s.serve_forever()
asyncio.run(main())
"""


async def read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    got = 0
    while got < length:
        data = await reader.read(1024 * 1024)
        if not data:
            raise RuntimeError("short body")
        got += len(data)
    return got


async def download(mode: str, port: int, sock: str) -> float:
    start = time.perf_counter()
    if mode == "direct":
        r, w = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        w.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
    elif mode == "proxy":
        r, w = await asyncio.open_unix_connection(sock, limit=1 << 20)
        w.write(f"GET http://127.0.0.1:{port}/big HTTP/1.1\r\n\r\n".encode())
    else:
        r, w = await asyncio.open_unix_connection(sock, limit=1 << 20)
        w.write(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
        assert (await r.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        w.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
    n = await read_response(r)
    elapsed = time.perf_counter() - start
    w.close()
    return n / elapsed


async def connect_once(mode: str, port: int, sock: str) -> float:
    start = time.perf_counter()
    if mode == "direct":
        r, w = await asyncio.open_connection("127.0.0.1", port)
    else:
        r, w = await asyncio.open_unix_connection(sock)
        w.write(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
        await r.readuntil(b"\r\n\r\n")
    elapsed = time.perf_counter() - start
    w.close()
    return elapsed


async def bench(args: argparse.Namespace, port: int, sock: str) -> None:
    rates: dict[str, list[float]] = {"direct": [], "proxy": [], "tunnel": []}
    for _ in range(args.rounds):
        for mode in ("direct", "proxy", "tunnel", "tunnel", "proxy", "direct"):
            rates[mode].append(await download(mode, port, sock))
    best = {m: statistics.median(v) for m, v in rates.items()}
    for mode, rate in best.items():
        print(f"download {args.mb} MB  {mode:7s} {rate / 1e6:8.0f} MB/s (median)")
    print(f"throughput ratio  absolute-form GET ÷ direct: {best['proxy'] / best['direct']:.3f}")
    print(f"throughput ratio  CONNECT tunnel   ÷ direct: {best['tunnel'] / best['direct']:.3f}")
    lat: dict[str, list[float]] = {"direct": [], "proxy": []}
    for _ in range(args.connects):
        for mode in ("direct", "proxy"):
            lat[mode].append(await connect_once(mode, port, sock))
    p50 = {m: statistics.median(v) * 1e3 for m, v in lat.items()}
    print(f"connect p50 direct {p50['direct']:.3f} ms, via proxy {p50['proxy']:.3f} ms")
    print(f"added connect latency p50: {p50['proxy'] - p50['direct']:.3f} ms (target <= 1 ms)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=int, default=50)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--connects", type=int, default=200)
    args = p.parse_args()
    origin = subprocess.Popen(
        [sys.executable, "-c", ORIGIN, str(args.mb * 1024 * 1024)],
        stdout=subprocess.PIPE,
        text=True,
    )
    port = int(origin.stdout.readline())  # type: ignore[union-attr]
    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "bench.yaml"
        policy.write_text(
            "network:\n  allow:\n"
            f"    - {{host: 127.0.0.1, ports: [{port}], allow_private: true}}\n"
            "  approval: {mode: deny}\n"
        )
        sock = os.path.join(tmp, "egress.sock")
        proxy = subprocess.Popen(
            [sys.executable, "-m", "sandbox.proxy", "--socket", sock, "--policy", str(policy),
             "--admin-socket", os.path.join(tmp, "admin.sock"),
             "--audit-log", os.path.join(tmp, "audit.jsonl")],
            cwd=REPO, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert proxy.stdout is not None and proxy.stdout.readline().startswith("ready")
            asyncio.run(bench(args, port, sock))
        finally:
            proxy.terminate()
            origin.terminate()
            proxy.wait()
            origin.wait()


if __name__ == "__main__":
    main()
