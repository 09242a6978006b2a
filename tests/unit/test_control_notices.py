"""The control plane's turn notices (issue 13, item 5): a reply from the embedded demonstration
model is labelled as such, with the way to a real model, and dropped tools are named; the facts
come from the backend's own /v1/models card (here a real loopback HTTP server standing in for
it), asked briefly and cached, and where it cannot be asked nothing is said."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from appliance.config import ApplianceConfig
from appliance.control import notices
from appliance.control.notices import turn_notices
from tests.helpers import free_port

EMBEDDED = {
    "id": "nemotron",
    "object": "model",
    "root": "SmolLM2-135M-Instruct.Q4_1",
    "max_model_len": 32768,
    "appliance": {"tools": False, "demonstration": True},
}
VLLM = {"id": "nemotron", "object": "model", "root": "nvidia/Nemotron-3-Super", "max_model_len": 1}


class Backend:
    """A loopback server answering GET /v1/models with `body` (after `delay` seconds)."""

    def __init__(self) -> None:
        self.body: Any = {"object": "list", "data": [EMBEDDED]}
        self.status = 200
        self.delay = 0.0
        self.hits = 0
        backend = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                backend.hits += 1
                time.sleep(backend.delay)
                raw = backend.body if isinstance(backend.body, bytes) else json.dumps(backend.body)
                data = raw if isinstance(raw, bytes) else raw.encode()
                self.send_response(backend.status if self.path == "/v1/models" else 404)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        poll = {"poll_interval": 0.02}  # a quick shutdown
        threading.Thread(target=self.server.serve_forever, kwargs=poll, daemon=True).start()

    def card(self, **changes: Any) -> None:
        self.body = {"object": "list", "data": [{**EMBEDDED, **changes}]}


@pytest.fixture(autouse=True)
def no_cache() -> Iterator[None]:
    notices._cache.clear()
    yield
    notices._cache.clear()


@pytest.fixture
def backend() -> Iterator[Backend]:
    b = Backend()
    yield b
    b.server.shutdown()
    b.server.server_close()


def config(tmp_path: Path, port: int, **inference: Any) -> ApplianceConfig:
    gateway = inference.pop("gateway", {})
    return ApplianceConfig(
        state_dir=tmp_path,
        gateway=gateway,
        inference={"backend_listen": {"port": port}, **inference},
    )


def test_the_demonstration_model_and_dropped_tools_are_named(
    tmp_path: Path, backend: Backend
) -> None:
    demo, tools = turn_notices(config(tmp_path, backend.port))
    assert demo.startswith("reply from SmolLM2-135M-Instruct.Q4_1, the embedded demonstration")
    assert "expect nonsense" in demo and "GPU host" in demo and "gateway.upstream" in demo
    assert tools == "tools ignored: SmolLM2-135M-Instruct.Q4_1's chat template has no tool slot"
    assert "\n" not in demo + tools


def test_each_fact_alone(tmp_path: Path, backend: Backend) -> None:
    cfg = config(tmp_path, backend.port)
    assert turn_notices(cfg, tools=False) == [notices.demonstration("SmolLM2-135M-Instruct.Q4_1")]
    backend.card(appliance={"tools": True, "demonstration": True})
    notices._cache.clear()
    assert len(turn_notices(cfg)) == 1 and "demonstration" in turn_notices(cfg)[0]
    backend.card(root="my-model", appliance={"tools": False, "demonstration": False})
    notices._cache.clear()
    assert turn_notices(cfg) == ["tools ignored: my-model's chat template has no tool slot"]
    backend.card(appliance={"tools": None, "demonstration": False})  # the server cannot tell
    notices._cache.clear()
    assert turn_notices(cfg) == []


@pytest.mark.parametrize(
    "body",
    [
        {"object": "list", "data": [VLLM]},  # vLLM's card: no `appliance` field
        {"object": "list", "data": [{**EMBEDDED, "id": "other"}]},  # not the served model
        {"object": "list", "data": [{**EMBEDDED, "appliance": "yes"}]},
        {"object": "list", "data": "nope"},
        {"data": [None, 3, "x"]},
        [1, 2],
        b"not json",
        b"",
    ],
)
def test_a_card_that_does_not_say_gives_no_notice(
    tmp_path: Path, backend: Backend, body: Any
) -> None:
    backend.body = body
    assert turn_notices(config(tmp_path, backend.port)) == []


def test_a_backend_error_gives_no_notice(tmp_path: Path, backend: Backend) -> None:
    backend.status = 503
    assert turn_notices(config(tmp_path, backend.port)) == []


def test_a_hostile_model_name_stays_one_printable_line(tmp_path: Path, backend: Backend) -> None:
    backend.card(root="evil\r\n\x1b[31m" + "x" * 500)
    for line in turn_notices(config(tmp_path, backend.port)):
        assert line.isprintable() and line.isascii() and "x" * 81 not in line


def test_nothing_is_asked_when_the_agent_is_not_on_the_local_model(
    tmp_path: Path, backend: Backend
) -> None:
    upstream = {"base_url": "http://127.0.0.1:9/v1", "models": ["big/model"]}
    routed = {"upstream": upstream, "aliases": {"default": "big/model"}}
    assert turn_notices(config(tmp_path, backend.port, gateway=routed)) == []
    assert turn_notices(config(tmp_path, backend.port), model="big/model") == []
    assert turn_notices(config(tmp_path, backend.port, backend="vllm")) == []
    assert backend.hits == 0
    assert turn_notices(config(tmp_path, backend.port), model="nemotron")  # the served name


def test_no_backend_no_notice_and_no_wait(tmp_path: Path) -> None:
    start = time.monotonic()
    assert turn_notices(config(tmp_path, free_port())) == []
    assert time.monotonic() - start < 1.0


def test_a_slow_backend_is_given_up_on(tmp_path: Path, backend: Backend) -> None:
    backend.delay = 3.0
    start = time.monotonic()
    assert turn_notices(config(tmp_path, backend.port)) == []
    assert time.monotonic() - start < notices.ASK_TIMEOUT_S + 0.5


def test_answers_are_cached_and_failures_retried_soon(
    tmp_path: Path, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(tmp_path, backend.port)
    results = []

    def turn() -> None:
        results.append(turn_notices(cfg))

    threads = [threading.Thread(target=turn) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 16 and all(len(r) == 2 for r in results)
    assert backend.hits == 1  # racing first turns wait for one ask
    hits = backend.hits
    for _ in range(5):
        turn_notices(cfg)
    assert backend.hits == hits
    backend.status = 500
    monkeypatch.setattr(notices, "CACHE_S", 0.0)
    notices._cache.clear()
    assert turn_notices(cfg) == [] and turn_notices(cfg) == []
    assert backend.hits == hits + 1  # the failure is remembered for RETRY_S too


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8000/v1/models"),
        ("0.0.0.0", "http://127.0.0.1:8000/v1/models"),
        ("::1", "http://[::1]:8000/v1/models"),
        ("::", "http://[::1]:8000/v1/models"),
    ],
)
def test_the_backend_is_asked_on_its_internal_listener(tmp_path: Path, host: str, url: str):
    cfg = ApplianceConfig(
        state_dir=tmp_path, inference={"backend_listen": {"host": host, "port": 8000}}
    )
    assert notices.backend_url(cfg) == url
