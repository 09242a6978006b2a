"""Fuzz the gateway with hypothesis: random JSON bodies, near-valid requests and random headers
never get a 5xx — except 503 while the backend is deliberately down. Valid requests really reach
the stand-in vLLM process, so the whole forwarding path is fuzzed too."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from appliance.store.inference_store import InferenceStore
from inference.gateway import GatewaySettings, create_app
from tests.helpers import free_port
from tests.integration.gateway_harness import start_fake_vllm, stop

pytestmark = pytest.mark.integration

FUZZ = settings(
    max_examples=150,
    derandomize=os.environ.get("CI") == "true",  # CI replays one fixed sequence; dev runs explore
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", ""]) | st.text(max_size=5)},
    optional={"content": json_values, "tool_calls": json_values, "name": json_values},
)
# Near-valid requests: the right fields with values at and past their edges. Token counts stay
# small so the backend answers quickly.
near_valid = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["nemotron", "smol", "unknown"]) | st.text(max_size=8),
        "messages": st.lists(message, max_size=3) | json_values,
    },
    optional={
        "stream": st.booleans() | json_values,
        "stream_options": st.fixed_dictionaries({}, optional={"include_usage": json_values})
        | json_values,
        "max_tokens": st.integers(-2, 6) | json_values,
        "temperature": st.floats(-1, 3, allow_nan=False) | json_values,
        "top_p": st.floats(-0.5, 1.5, allow_nan=False),
        "n": st.integers(-1, 3),
        "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=2) | json_values,
        "seed": st.integers(-(2**70), 2**70),
        "tools": json_values,
        "tool_choice": json_values,
        "extra": json_values,
        "prompt": json_values,
    },
)
# Valid requests (for either route) with random extra fields and edge values: these reach the
# backend and exercise forwarding, streaming and metering.
valid = st.builds(
    lambda base, extra: {**extra, **base},
    st.fixed_dictionaries(
        {
            "model": st.sampled_from(["nemotron", "smol"]),
            "messages": st.lists(
                st.fixed_dictionaries(
                    {"role": st.sampled_from(["user", "system"]), "content": st.text(max_size=30)}
                ),
                min_size=1,
                max_size=3,
            ),
            "prompt": st.text(max_size=30) | st.lists(st.integers(0, 1000), max_size=5),
        },
        optional={
            "stream": st.booleans(),
            "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
            "max_tokens": st.integers(1, 6),
            "temperature": st.floats(0, 2),
            "top_p": st.floats(0, 1),
            "stop": st.lists(st.sampled_from(["tok1", "tok3", "x"]), max_size=2),
            "seed": st.integers(0, 2**31),
            "tools": st.just([{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        },
    ),
    st.dictionaries(st.text(max_size=10), json_values, max_size=3),
)
bodies = (
    valid | valid | near_valid | json_values | st.binary(max_size=64)  # raw bytes: not JSON at all
)
paths = st.sampled_from(["/v1/chat/completions", "/v1/completions"])


@pytest.fixture(scope="module")
def backend() -> Iterator[int]:
    port = free_port()
    proc = start_fake_vllm(port)
    try:
        yield port
    finally:
        stop(proc)


def gateway(
    tmp_path: Path, backend_port: int, max_body_bytes: int | None = None
) -> tuple[TestClient, str]:
    store = InferenceStore(tmp_path)
    _, secret = store.create_key("fuzzer", "client")
    limits = {} if max_body_bytes is None else {"max_body_bytes": max_body_bytes}
    cfg = GatewaySettings(
        backend_url=f"http://127.0.0.1:{backend_port}",
        aliases={"smol": "nemotron"},
        limits=limits,
    )
    app = create_app(cfg, store, store, store, store)
    return TestClient(app, raise_server_exceptions=False), secret


def post(client: TestClient, path: str, body: Any, headers: dict[str, str]) -> int:
    # bytes go out as they are; anything else (a JSON string too) is serialised as JSON.
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with client.stream("POST", path, content=content, headers=headers) as resp:
        resp.read()  # streams too: a broken stream would show as an exception here
        return resp.status_code


@FUZZ
@given(body=bodies, path=paths)
def test_random_bodies_never_5xx(tmp_path: Path, backend: int, body: Any, path: str) -> None:
    client, secret = _cached(tmp_path, backend)
    status = post(client, path, body, {"authorization": f"Bearer {secret}"})
    event(f"status {status}")
    assert status < 500, (status, body)


@FUZZ
@given(
    auth=st.one_of(st.none(), st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126))),
    extra=st.dictionaries(
        st.from_regex(r"\A[a-z][a-z0-9-]{0,15}\Z"),
        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20),
        max_size=3,
    ),
    path=paths,
)
def test_random_headers_never_5xx(
    tmp_path: Path, backend: int, auth: str | None, extra: dict[str, str], path: str
) -> None:
    client, _ = _cached(tmp_path, backend)
    headers = {k: v for k, v in extra.items() if k not in {"content-length", "transfer-encoding"}}
    if auth is not None:
        headers["authorization"] = auth
    body = {"model": "nemotron", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    status = post(client, path, body, headers)
    assert status < 500 and (status == 401 or headers.get("authorization")), status


@FUZZ
@given(body=valid | near_valid, path=paths)
def test_backend_down_is_503_never_another_5xx(tmp_path: Path, body: Any, path: str) -> None:
    client, secret = _cached(tmp_path, free_port(), key="down")
    status = post(client, path, body, {"authorization": f"Bearer {secret}"})
    event(f"status {status}")
    assert status < 500 or status == 503, (status, body)


SMALL_CAP = 2048


@settings(FUZZ, max_examples=60)
@given(
    size=st.integers(64, 2 * SMALL_CAP),  # the unpadded body is 48 bytes
    cuts=st.lists(st.integers(1, 2 * SMALL_CAP), max_size=12),
    chunked=st.booleans(),
)
def test_body_cap_holds_however_the_body_is_cut(
    tmp_path: Path, backend: int, size: int, cuts: list[int], chunked: bool
) -> None:
    """A valid request padded to `size` bytes, sent whole or as chunks cut anywhere: 413 past
    the cap, however it is framed; at or under it, the request goes through."""
    client, secret = _cached(tmp_path, backend, key="capped", max_body_bytes=SMALL_CAP)
    body = json.dumps({"model": "nemotron", "prompt": "x", "max_tokens": 1}).encode()
    body = body[:-1] + b" " * (size - len(body)) + b"}"
    bounds = [0, *sorted({c for c in cuts if c < size}), size]
    pieces = [body[a:b] for a, b in itertools.pairwise(bounds)]
    content = iter(pieces) if chunked else body  # an iterator goes out chunked
    headers = {"authorization": f"Bearer {secret}"}
    with client.stream("POST", "/v1/completions", content=content, headers=headers) as resp:
        resp.read()
        status = resp.status_code
    event(f"status {status}")
    assert status == (413 if size > SMALL_CAP else 200), (status, size, chunked)


_clients: dict[str, tuple[TestClient, str]] = {}


def _cached(
    tmp_path: Path, port: int, key: str = "up", max_body_bytes: int | None = None
) -> tuple[TestClient, str]:
    """One gateway per fuzz test (hypothesis reuses the function's tmp_path for its examples)."""
    if key not in _clients:
        client, secret = gateway(tmp_path / key, port, max_body_bytes)
        client.__enter__()
        _clients[key] = (client, secret)
    return _clients[key]


@pytest.fixture(autouse=True, scope="module")
def _close_clients() -> Iterator[None]:
    yield
    for client, _ in _clients.values():
        client.__exit__(None, None, None)
    _clients.clear()
