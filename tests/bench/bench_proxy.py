"""Benchmark: the egress proxy versus going direct, on loopback.

1. Download of a ~50 MB body from a loopback origin: through the proxy's unix socket (absolute-form
   GET and a CONNECT tunnel) ÷ direct. Target >= 0.9.
2. Added connect latency: p50 of (unix connect + CONNECT + 200) minus p50 of a direct TCP connect,
   over 200 connects each, interleaved. Target <= 1 ms.

The origin and the proxy (`python -m sandbox.proxy`) run as their own processes, as in production.
Modes run interleaved, each round in a rotated order, and the ratios are medians of per-round
ratios, so load from elsewhere on the box hits direct and proxied alike. The client is a lean
blocking socket reader. The origin serves the body two ways, both reported: `write` (one 1 MiB
buffer written over and over: cheap and cache-hot, the direct run's best case) and `sendfile`
(from the page cache, as a static web server does). CPU seconds per GB of each process are
printed: on a 2-core box the proxied run has three busy processes where the direct run has two.

`--compare DIR` also runs a second proxy from another source tree (e.g. `git worktree add DIR
HEAD`), side by side in the same rounds.

    .venv/bin/python tests/bench/bench_proxy.py [--mb 50] [--rounds 7] [--connects 200]
        [--origin both|write|sendfile] [--compare DIR]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECV = 1024 * 1024
TICK = os.sysconf("SC_CLK_TCK")

ORIGIN = r"""
import asyncio, os, sys
PATH = sys.argv[1]
SIZE = os.path.getsize(PATH)
BLOCK = b"x" * (1024 * 1024)
async def handle(r, w):
    loop = asyncio.get_running_loop()
    try:
        while True:
            head = await r.readuntil(b"\r\n\r\n")
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % SIZE)
            if b"/sendfile " in head:
                with open(PATH, "rb") as f:
                    await loop.sendfile(w.transport, f)
            else:
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


@dataclass
class Proxy:
    name: str  # "proxy" (this tree) or "base" (--compare)
    sock: str
    proc: subprocess.Popen[str]


@dataclass
class Tally:
    rates: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)  # process → CPU seconds
    nbytes: int = 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def recv_head(s: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        more = s.recv(65536)
        if not more:
            raise RuntimeError("closed before the head")
        data += more
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def open_stream(mode: str, port: int, sock: str) -> socket.socket:
    if mode == "direct":
        return socket.create_connection(("127.0.0.1", port))
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    if mode.endswith("tunnel"):
        s.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
        head, rest = recv_head(s)
        assert head.startswith(b"HTTP/1.1 200") and not rest
    return s


def download(mode: str, port: int, sock: str, origin: str) -> int:
    s = open_stream(mode, port, sock)
    with s:
        url = f"http://127.0.0.1:{port}/{origin}" if mode.endswith("get") else f"/{origin}"
        s.sendall(f"GET {url} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        head, rest = recv_head(s)
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        got, buf = len(rest), memoryview(bytearray(RECV))
        while got < length:
            n = s.recv_into(buf)
            if not n:
                raise RuntimeError("short body")
            got += n
        return got


@contextmanager
def measured(tally: Tally, pids: dict[str, int]) -> Iterator[None]:
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    client = time.process_time()
    yield
    for name, pid in pids.items():
        tally.cpu[name] = tally.cpu.get(name, 0.0) + cpu_seconds(pid) - before[name]
    tally.cpu["client"] = tally.cpu.get("client", 0.0) + time.process_time() - client


def throughput(
    args: argparse.Namespace, kind: str, port: int, origin: int, proxies: list[Proxy]
) -> None:
    modes = ["direct"] + [f"{p.name}-{kind}" for p in proxies for kind in ("get", "tunnel")]
    by_name = {p.name: p for p in proxies}
    tallies = {m: Tally() for m in modes}
    for r in range(args.rounds):
        order = modes[r % len(modes) :] + modes[: r % len(modes)]
        rates = {}
        for mode in order + order[::-1]:  # each mode twice, mirrored: drift hits all alike
            owner = mode.split("-")[0]
            proxy = by_name.get(owner)
            pids = {"origin": origin} | ({"proxy": proxy.proc.pid} if proxy else {})
            tally = tallies[mode]
            with measured(tally, pids):
                start = time.perf_counter()
                n = download(mode, port, proxy.sock if proxy else "", kind)
                rate = n / (time.perf_counter() - start)
            tally.nbytes += n
            tally.rates.append(rate)
            rates.setdefault(mode, []).append(rate)
        for mode in modes:
            tallies[mode].ratios.append(
                statistics.mean(rates[mode]) / statistics.mean(rates["direct"])
            )
    print(f"download {args.mb} MB, {args.rounds} rounds, origin {kind}, {os.cpu_count()} CPUs")
    for mode, t in tallies.items():
        per_gb = "  ".join(f"{k} {v / t.nbytes * 1e9:5.2f}" for k, v in sorted(t.cpu.items()))
        print(
            f"  {mode:12s} {statistics.median(t.rates) / 1e6:7.0f} MB/s   "
            f"÷ direct {statistics.median(t.ratios):.3f} "
            f"(min {min(t.ratios):.3f}, max {max(t.ratios):.3f})   CPU s/GB: {per_gb}"
        )


def connect_once(mode: str, port: int, sock: str) -> float:
    start = time.perf_counter()
    s = open_stream(mode, port, sock)
    elapsed = time.perf_counter() - start
    s.close()
    return elapsed


def latency(args: argparse.Namespace, port: int, proxies: list[Proxy]) -> None:
    modes = {"direct": ""} | {f"{p.name}-tunnel": p.sock for p in proxies}
    lat: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.connects):
        for mode, sock in modes.items():
            lat[mode].append(connect_once(mode, port, sock))
    p50 = {m: statistics.median(v) * 1e3 for m, v in lat.items()}
    for mode in modes:
        if mode != "direct":
            print(
                f"  connect p50 direct {p50['direct']:.3f} ms, {mode} {p50[mode]:.3f} ms: "
                f"added {p50[mode] - p50['direct']:.3f} ms (target <= 1 ms)"
            )


def start_proxy(name: str, tree: Path, tmp: str, policy: Path, module: str) -> Proxy:
    sock = os.path.join(tmp, f"{name}.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--socket", sock, "--policy", str(policy),
         "--admin-socket", os.path.join(tmp, f"{name}-admin.sock"),
         "--audit-log", os.path.join(tmp, f"{name}-audit.jsonl")],
        cwd=tree, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(tree)},
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().startswith("ready")
    return Proxy(name, sock, proc)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=int, default=50)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--connects", type=int, default=200)
    p.add_argument("--origin", choices=("both", "write", "sendfile"), default="both")
    p.add_argument("--compare", type=Path, help="another source tree to run as 'base'")
    p.add_argument(
        "--launcher",
        choices=("sandbox.proxy", "appliance.control.egress_monitor"),
        default="sandbox.proxy",
        help="appliance.control.egress_monitor: as the appliance runs it (audit chain; as root, "
        "privilege-separated where the tree has that)",
    )
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        body = Path(tmp) / "body"
        body.write_bytes(os.urandom(1 << 20) * args.mb)
        origin = subprocess.Popen(
            [sys.executable, "-c", ORIGIN, str(body)],
            stdout=subprocess.PIPE,
            text=True,
        )
        procs: list[subprocess.Popen[str]] = [origin]
        try:
            port = int(origin.stdout.readline())  # type: ignore[union-attr]
            policy = Path(tmp) / "bench.yaml"
            policy.write_text(
                "network:\n  allow:\n"
                f"    - {{host: 127.0.0.1, ports: [{port}], allow_private: true}}\n"
                "  approval: {mode: deny}\n"
            )
            trees = [("proxy", REPO)] + ([("base", args.compare)] if args.compare else [])
            proxies = [start_proxy(n, tree, tmp, policy, args.launcher) for n, tree in trees]
            procs += [px.proc for px in proxies]
            for kind in ("write", "sendfile") if args.origin == "both" else (args.origin,):
                throughput(args, kind, port, origin.pid, proxies)
            latency(args, port, proxies)
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait()


if __name__ == "__main__":
    main()
