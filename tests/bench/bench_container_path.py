"""Benchmark: the embedded model on the host (the venv path) vs in the CPU appliance image under
the service user's rootless Podman (the container path), through the backend directly.

Both backends are what `appliance up` runs: supervisor.backend_process() for a config with
`inference.backend: embedded` (the venv's python, `--cache-dir <models_dir>/cache`) and one with
`inference.backend: container` (the foreground `podman run` of the cpu image, as the service
user, its cache on the named volume). One backend at a time, the two paths alternating round by
round (which goes first alternates too: machine noise hits both alike). Each round, per path:

- cold start: the converted-weights cache emptied first (the host's cache dir removed, the
  container's volume removed; the OS page cache is left warm); the server's own model-load time
  (from its log), time to /health 200 and to ready (after the warm-up request, what `appliance
  up` waits for), then the first chat completion, then stop (SIGTERM / `podman stop`);
- warm start: the cache from the cold start present; the same, then REPS more chat completions
  (steady state), then stop.

A chat completion is one user message, 32 greedy tokens (ignore_eos), streamed: latency, time to
first token, and decode tokens/s (tokens after the first over the time after the first).
Reports medians and container/host ratios; `--json FILE` also writes every sample.
Not a test: run it by hand, as root (the service user's Podman, as the supervisor runs it):
`.venv/bin/python tests/bench/bench_container_path.py [--rounds 2] [--reps 5] [--json out.json]`.
Without `--image` it uses the cpu image of this tree's inputs (built if missing: minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from appliance.config import ApplianceConfig
from appliance.services import supervisor as sv
from hardware.planner import plan_serving
from hardware.snapshot import HostSnapshot
from inference.backends import ProcessBackend
from inference.backends.container import ContainerSpec
from tests.helpers import SERVICE_USER, free_port
from tests.sandbox_fixtures import IMAGE_CACHE, podman_client, sandbox_skip_reason

REPO = Path(__file__).resolve().parents[2]
CPU_HOST = REPO / "tests" / "fixtures" / "hosts" / "cpu_only.json"
PATHS = ("host", "container")
READY_TIMEOUT_S = 600
MAX_TOKENS = 32
PROMPT = "Write a short story about a lighthouse keeper and a storm."
# The server's own load time, and whether it converted the GGUF or read the cache.
LOADED = re.compile(r"embedded: loaded \S+ in ([0-9.]+) s \((converted|from the weights cache);")


def ensure_image() -> str:
    """The cpu image of this tree's inputs, in the service user's store (built if missing)."""
    from appliance.packaging.appliance_image_build import build_appliance_image

    ref = build_appliance_image(podman_client(), "cpu", workdir=IMAGE_CACHE, progress=print)
    return str(ref.tag)


def pin_image(image: str) -> str:
    """A tag of the bench's own on `image`: a build of newer inputs meanwhile prunes older
    images that no container runs (between our starts, none does), but not one with two tags."""
    name = f"localhost/appliance-cpu:bench-{os.getpid()}"
    done = podman_client().images.get(image).tag(*name.rsplit(":", 1))
    if not done:
        raise SystemExit(f"cannot tag {image} as {name}")
    return name


@dataclass(frozen=True)
class Subject:
    """One path's backend, as supervisor.backend_process() builds it, and its weights cache."""

    path: str
    backend: ProcessBackend
    cache_dir: Path  # its --cache-dir (in the container: on the cache volume)
    model: str


def make_subject(path: str, root: Path, image: str) -> Subject:
    port = free_port()
    inference: dict[str, Any] = {"backend": "embedded", "backend_listen": {"port": port}}
    if path == "container":
        inference.update(backend="container", container={"image": image})
    config = ApplianceConfig.model_validate(
        {
            "state_dir": root / path,
            "inference": inference,
            "sandbox": {"service_user": SERVICE_USER},
        }
    )
    host = HostSnapshot.model_validate_json(CPU_HOST.read_text())
    plan = plan_serving(
        host,
        None,
        served_model_name=config.inference.served_model_name,
        port=port,
        embedded_context=config.inference.embedded_context,
    )
    backend = sv.backend_process(config, plan)
    assert (backend.container is not None) == (path == "container"), backend.command_line()
    argv = backend.argv  # the inner command: what the host would exec
    cache_dir = Path(argv[argv.index("--cache-dir") + 1])
    return Subject(path, backend, cache_dir, config.inference.served_model_name)


def podman(spec: ContainerSpec, *args: str) -> subprocess.CompletedProcess[str]:
    """podman as the container's account (the service user), as ProcessBackend runs it."""
    return subprocess.run(
        spec.podman_argv(*args),
        capture_output=True,
        text=True,
        env=spec.process_env(os.environ, {}),
        cwd=spec.account.home,
        timeout=120,
        check=False,
        **spec.account.popen_kwargs(os.geteuid()),  # type: ignore[arg-type]
    )


def remove_volume(spec: ContainerSpec) -> None:
    if podman(spec, "volume", "exists", spec.cache_volume).returncode != 0:
        return  # `volume rm` fails on a volume that is not there, --force or not
    done = podman(spec, "volume", "rm", "--force", spec.cache_volume)
    if done.returncode != 0:
        raise SystemExit(f"cannot remove the cache volume: {done.stderr.strip()}")


def empty_cache(subject: Subject) -> None:
    """Cold: no converted weights (the OS page cache is not dropped: the GGUF is read warm)."""
    if subject.backend.container is None:
        shutil.rmtree(subject.cache_dir, ignore_errors=True)
    else:
        remove_volume(subject.backend.container)


def start(backend: ProcessBackend, cold: bool) -> dict[str, float]:
    """start() -> /health 200 -> ready (wait_ready: the warm-up request), as launch() does."""
    t0 = time.perf_counter()
    backend.start()
    try:
        while not backend.health():
            if not backend.running:
                raise SystemExit(f"{backend.name} exited: {backend.log_tail()}")
            if time.perf_counter() - t0 > READY_TIMEOUT_S:
                raise SystemExit(f"{backend.name} not healthy: {backend.last_log_line()}")
            time.sleep(0.05)
        healthy = time.perf_counter() - t0
        backend.wait_ready(READY_TIMEOUT_S, interval=0.05)
    except BaseException:
        backend.stop(grace=5.0)
        raise
    ready = time.perf_counter() - t0
    loaded = LOADED.search(backend.log_since_start())
    if loaded is None:
        raise SystemExit(f"{backend.name}: no load time in its log: {backend.log_tail()}")
    if (loaded.group(2) == "converted") != cold:
        raise SystemExit(f"{backend.name}: a {'cold' if cold else 'warm'} start {loaded.group(2)}")
    return {"load_s": float(loaded.group(1)), "healthy_s": healthy, "ready_s": ready}


def chat(subject: Subject, client: httpx.Client) -> dict[str, float]:
    """One streamed chat completion of MAX_TOKENS greedy tokens."""
    backend = subject.backend
    body = {
        "model": subject.model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first = None
    tokens = 0
    with client.stream("POST", f"{backend.api_base}/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    if first is None or tokens < 2:
        raise SystemExit(f"{backend.name}: a completion of {tokens} tokens, no content")
    return {
        "latency_s": end - t0,
        "ttft_s": first - t0,
        "decode_tok_s": (tokens - 1) / (end - first),
        "tokens": tokens,
    }


def stop(backend: ProcessBackend) -> float:
    t0 = time.perf_counter()
    backend.stop(grace=10.0)
    return time.perf_counter() - t0


def one_round(subject: Subject, reps: int, out: dict[str, list[float]]) -> None:
    backend = subject.backend
    with httpx.Client(timeout=120) as client:
        empty_cache(subject)
        for key, value in start(backend, cold=True).items():
            out[f"cold_{key}"].append(value)
        out["cold_first_request_s"].append(chat(subject, client)["latency_s"])
        out["stop_s"].append(stop(backend))

        for key, value in start(backend, cold=False).items():
            out[f"warm_{key}"].append(value)
        out["warm_first_request_s"].append(chat(subject, client)["latency_s"])
        try:
            for _ in range(reps):
                for key, value in chat(subject, client).items():
                    if key != "tokens":
                        out[f"steady_{key}"].append(value)
        finally:
            out["stop_s"].append(stop(backend))


ROWS = (  # key, label, unit ("s" or "tok/s")
    ("cold_load_s", "cold: model load (the server's own figure)", "s"),
    ("cold_healthy_s", "cold start -> /health 200", "s"),
    ("cold_ready_s", "cold start -> ready (warmed up)", "s"),
    ("cold_first_request_s", "first chat request after a cold start", "s"),
    ("warm_load_s", "warm: model load (the server's own figure)", "s"),
    ("warm_healthy_s", "warm start -> /health 200", "s"),
    ("warm_ready_s", "warm start -> ready (warmed up)", "s"),
    ("warm_first_request_s", "first chat request after a warm start", "s"),
    ("steady_latency_s", f"steady chat, {MAX_TOKENS} tokens: latency", "s"),
    ("steady_ttft_s", "steady chat: time to first token", "s"),
    ("steady_decode_tok_s", "steady chat: decode", "tok/s"),
    ("stop_s", "stop (SIGTERM / podman stop)", "s"),
)


def fmt(value: float, unit: str) -> str:
    if unit == "tok/s":
        return f"{value:.1f} tok/s"
    return f"{value * 1e3:.0f} ms" if value < 1 else f"{value:.2f} s"


def table(results: dict[str, dict[str, list[float]]]) -> list[str]:
    lines = [f"{'measure (median)':42} {'host (venv)':>12} {'container':>12} {'ctr/host':>9}"]
    for key, label, unit in ROWS:
        host = statistics.median(results["host"][key])
        ctr = statistics.median(results["container"][key])
        lines.append(f"{label:42} {fmt(host, unit):>12} {fmt(ctr, unit):>12} {ctr / host:9.2f}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2, help="cold + warm starts per path (2)")
    p.add_argument("--reps", type=int, default=5, help="steady chat requests per warm start (5)")
    p.add_argument("--image", default=None, help="the cpu image (default: this tree's, built)")
    p.add_argument("--json", default=None, help="also write every sample here")
    args = p.parse_args()
    if (why := sandbox_skip_reason()) is not None:
        sys.exit(f"cannot run: {why}")
    image = args.image or ensure_image()
    pinned = pin_image(image)
    load_before = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="bench-ctr-"))
    subjects: dict[str, Subject] = {}
    results: dict[str, dict[str, list[float]]] = {
        path: {key: [] for key, _, _ in ROWS} for path in PATHS
    }
    try:
        for path in PATHS:
            subjects[path] = make_subject(path, root, pinned)
        for i in range(args.rounds):
            for path in PATHS if i % 2 == 0 else PATHS[::-1]:
                print(f"round {i + 1}/{args.rounds}: {path}", flush=True)
                one_round(subjects[path], args.reps, results[path])
    finally:
        for subject in subjects.values():
            subject.backend.stop(grace=5.0)
            if (spec := subject.backend.container) is not None:
                podman(spec, "rm", "--force", "--time=0", "--ignore", spec.name)  # interrupted
                remove_volume(spec)
        podman_client().images.remove(pinned)  # our tag only: the image keeps its others
        shutil.rmtree(root, ignore_errors=True)
    load_after = os.getloadavg()
    print(
        f"image {image}; {os.cpu_count()} CPUs, load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after; {args.rounds} rounds, {args.reps} steady requests each"
    )
    print("\n".join(table(results)))
    if args.json:
        meta = {
            "image": image,
            "cpus": os.cpu_count(),
            "load_before": load_before,
            "load_after": load_after,
            "rounds": args.rounds,
            "reps": args.reps,
            "max_tokens": MAX_TOKENS,
        }
        Path(args.json).write_text(json.dumps({"meta": meta, **results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
