"""The embedded backend as a real server process with the real model (SmolLM2-135M, GGUF): how
the integration tests start one, and the session fixtures they share (registered in
tests/integration/conftest.py, so each xdist worker starts one server for all its modules).
The converted weights are cached in pytest's cache dir (.pytest_cache/, git-ignored) so only the
first run pays the ~20 s GGUF conversion."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from inference.embedded import weights
from tests.helpers import free_port

MODEL = "nemotron"
REPO = Path(__file__).resolve().parents[2]
CHAT = [{"role": "user", "content": "Name three colours of the rainbow."}]


def start_server(cache_dir: Path, log: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """`python -m inference.embedded` on a free port; returns once /health answers 200."""
    port = free_port()
    argv = [sys.executable, "-m", "inference.embedded", "--port", str(port),
            "--served-model-name", MODEL, "--cache-dir", str(cache_dir), *extra]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300  # a cold start converts the GGUF
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server not healthy in time: {log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def weights_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        weights.default_gguf()
    except weights.ModelNotFound as exc:
        pytest.skip(str(exc))
    cache = getattr(request.config, "cache", None)
    return cache.mkdir("embedded-models") if cache else tmp_path_factory.mktemp("embedded-models")


@pytest.fixture(scope="session")
def server(weights_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("embedded") / "server.log"
    proc, url = start_server(weights_cache, log)
    yield url
    stop_server(proc)


@pytest.fixture(scope="session")
def tokenizer(server: str, weights_cache: Path) -> object:
    """The model's tokenizer, loaded independently of the server (from the weights cache)."""
    from transformers import AutoTokenizer

    src = weights.resolve(None)
    return AutoTokenizer.from_pretrained(weights.cache_dir_for(src, weights_cache))


@pytest.fixture
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client: openai.OpenAI, **kw: object) -> object:
    args = {"model": MODEL, "messages": CHAT, "max_tokens": 24, "temperature": 0, **kw}
    return client.chat.completions.create(**args)


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(
            f'{k}="{v}"' in line for k, v in labels.items()
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
