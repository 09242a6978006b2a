"""Faults with real processes: the backend dies mid-stream, the local backend is down (fallback to
an upstream that needs a key only the gateway holds), the gateway restarts with rows in flight."""

from __future__ import annotations

import concurrent.futures
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

from appliance.store.inference_store import InferenceStore
from tests.helpers import free_port
from tests.integration.gateway_harness import (
    running,
    start_fake_vllm,
    start_gateway,
    stop,
)

pytestmark = pytest.mark.integration

HI = [{"role": "user", "content": "hi there"}]


def client(port: int, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=secret, max_retries=0)


def wait_rows(store: InferenceStore, key_id: str, n: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while store.usage_totals(key_id)["requests"] < n and time.monotonic() < deadline:
        time.sleep(0.02)


def test_backend_killed_mid_stream(tmp_path: Path) -> None:
    bport, gport = free_port(), free_port()
    backend = start_fake_vllm(bport, {"FAKE_VLLM_TOKEN_DELAY": "0.01", "FAKE_VLLM_DIE_AFTER": "5"})
    store = InferenceStore(tmp_path)
    key, secret = store.create_key("victim", "client")
    settings = {"backend_url": f"http://127.0.0.1:{bport}"}
    with running(backend), running(start_gateway(tmp_path, gport, settings)):
        c = client(gport, secret)
        received: list[str] = []
        with pytest.raises(openai.APIError, match=r"mid-stream|closed the stream") as broke:
            for chunk in c.chat.completions.create(
                model="nemotron", messages=HI, max_tokens=50, stream=True
            ):
                if chunk.choices:
                    received.append(chunk.choices[0].delta.content or "")
        assert broke.value.body is not None  # the final SSE event, in OpenAI's error shape
        assert "".join(received) == "tok0 tok1 tok2 tok3 tok4"
        assert backend.wait(5) != 0  # it really died
        assert httpx.get(f"http://127.0.0.1:{gport}/health/live").status_code == 200
        assert httpx.get(f"http://127.0.0.1:{gport}/health/ready").status_code == 503
        with pytest.raises(openai.InternalServerError) as down:
            c.chat.completions.create(model="nemotron", messages=HI)
        assert down.value.status_code == 503
        wait_rows(store, key.id, 2)
    rows = store.usage_rows(key.id)
    assert [(r.status, r.stream) for r in rows] == [(502, True), (503, False)]
    # What was served, bounded from the stream: its text's bytes, one more per event (a token
    # is at least a byte, but a special token the server strips is none).
    assert rows[0].completion_tokens == len(b"tok0 tok1 tok2 tok3 tok4") + 5
    assert rows[0].prompt_tokens > 0


def test_fallback_to_upstream_with_the_gateways_key(tmp_path: Path) -> None:
    uport, gport, dead_port = free_port(), free_port(), free_port()
    upstream = start_fake_vllm(uport, {"VLLM_API_KEY": "nvapi-upstream"}, name="remote/model")
    store = InferenceStore(tmp_path)
    _, secret = store.create_key("roamer", "client")
    settings = {
        "backend_url": f"http://127.0.0.1:{dead_port}",  # the local backend is down
        "upstream": {
            "base_url": f"http://127.0.0.1:{uport}/v1",
            "api_key_env": "TEST_UPSTREAM_KEY",
            "models": ["remote/model"],
            "fallback": True,
        },
        "prices": {"remote/model": {"prompt_per_1m": 1e6, "completion_per_1m": 1e6}},
    }
    gateway = start_gateway(tmp_path, gport, settings, env={"TEST_UPSTREAM_KEY": "nvapi-upstream"})
    with running(upstream), running(gateway):
        c = client(gport, secret)
        raw = c.chat.completions.with_raw_response.create(
            model="nemotron", messages=HI, max_tokens=2
        )
        assert raw.headers["x-appliance-route"] == "upstream"
        assert raw.parse().model == "remote/model"
        direct = c.chat.completions.create(model="remote/model", messages=HI, max_tokens=2)
        assert direct.choices[0].message.content == "tok0 tok1"
        assert "remote/model" in [m.id for m in c.models.list()]
    rows = store.usage_rows()
    assert [r.model for r in rows] == ["remote/model", "remote/model"]
    assert rows[0].cost == pytest.approx(4.0)  # 2 + 2 tokens at 1 a token


def test_gateway_restart_loses_no_ledger_rows(tmp_path: Path) -> None:
    bport, gport = free_port(), free_port()
    store = InferenceStore(tmp_path)
    key, secret = store.create_key("steady", "client")
    settings = {"backend_url": f"http://127.0.0.1:{bport}"}
    with running(start_fake_vllm(bport)):
        gateway = start_gateway(tmp_path, gport, settings)
        c = client(gport, secret)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            replies = list(
                pool.map(
                    lambda i: c.chat.completions.create(
                        model="nemotron", messages=HI, max_tokens=1 + i % 4
                    ),
                    range(40),
                )
            )
        # At once: rows may still be queued. uvicorn re-raises SIGTERM after its graceful
        # shutdown, so -15 is a clean exit too; the row count below is what matters.
        assert stop(gateway, signal.SIGTERM) in (0, -signal.SIGTERM)
        served = sum(r.usage.total_tokens for r in replies if r.usage)
        assert store.usage_totals(key.id)["requests"] == 40
        with running(start_gateway(tmp_path, gport, settings)):
            c.chat.completions.create(model="nemotron", messages=HI, max_tokens=3)
            wait_rows(store, key.id, 41)
    totals = store.usage_totals(key.id)
    assert totals["requests"] == 41
    assert totals["prompt_tokens"] + totals["completion_tokens"] == served + 5
