"""Real processes for the gateway tests and bench: the stand-in vLLM and the gateway itself.

    python -m tests.integration.gateway_harness --state-dir D --port N --settings JSON
        [--hard-stop-file PATH]

runs the gateway as `appliance serve gateway` does: InferenceStore + create_app + the guarded
uvicorn listener (inference.gateway.server),
with every hard-stop hook call appended (key id per line) to --hard-stop-file.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=0.5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer 200 in {timeout}s")


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def start_fake_vllm(
    port: int,
    env: dict[str, str] | None = None,
    name: str = "nemotron",
    args: list[str] | None = None,  # more vLLM flags, e.g. ["--max-model-len", "64"]
) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.fakes.fake_vllm",
            "serve",
            "fake/model",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--served-model-name",
            name,
            "--max-num-seqs",
            "256",
            *(args or []),
        ],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_http(f"http://127.0.0.1:{port}/health", proc)
    return proc


def start_gateway(
    state_dir: Path,
    port: int,
    settings: dict[str, Any],
    hard_stop_file: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable,
        "-m",
        "tests.integration.gateway_harness",
        "--state-dir",
        str(state_dir),
        "--port",
        str(port),
        "--settings",
        json.dumps(settings),
    ]
    if hard_stop_file is not None:
        argv += ["--hard-stop-file", str(hard_stop_file)]
    proc = subprocess.Popen(argv, cwd=REPO, env={**os.environ, **(env or {})})
    wait_http(f"http://127.0.0.1:{port}/health/live", proc)
    return proc


@contextmanager
def running(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    try:
        yield proc
    finally:
        stop(proc)


def main(argv: list[str] | None = None) -> None:
    from appliance.store.inference_store import InferenceStore
    from inference.gateway import GatewaySettings, create_app
    from inference.gateway.server import serve
    from inference.ports import ControlPlaneHooks, KeyRecord

    parser = argparse.ArgumentParser()
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--settings", default="{}")
    parser.add_argument("--hard-stop-file", type=Path)
    args = parser.parse_args(argv)

    store = InferenceStore(args.state_dir)
    hooks = ControlPlaneHooks()
    if args.hard_stop_file:

        def on_hard_stop(key: KeyRecord) -> None:
            with args.hard_stop_file.open("a") as f:
                f.write(key.id + "\n")

        hooks.on_hard_stop.append(on_hard_stop)
    settings = GatewaySettings.model_validate(json.loads(args.settings))
    app = create_app(settings, store, store, store, store, hooks)
    serve(app, "127.0.0.1", args.port, settings.limits)


if __name__ == "__main__":
    main()
