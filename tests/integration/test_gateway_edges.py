"""The gateway's edges, attacked over real sockets: a real gateway process (the harness runs it as
`appliance serve gateway` does) in front of the stand-in vLLM process.

Oversized bodies however they are framed, slowloris headers and bodies, too many connections
from one address, huge headers and garbage on the wire, out-of-range sampling fields and the
backend's own errors: each gets an answer in OpenAI's error shape, and nothing stays open.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from appliance.store.inference_store import InferenceStore
from tests.helpers import free_port
from tests.integration.gateway_harness import running, start_fake_vllm, start_gateway

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]
CAP = 32 * 1024 * 1024  # the default body cap
OPENAI_TYPES = {
    "invalid_request_error",
    "authentication_error",
    "permission_error",
    "rate_limit_error",
    "insufficient_quota",
    "server_error",
}
# Tight limits, so the timeout attacks take seconds, not minutes.
TIGHT = {"header_timeout_s": 1.5, "body_timeout_s": 1.5, "max_connections_per_client": 64}


class Gateway:
    def __init__(self, port: int, secret: str, store: InferenceStore, key_id: str) -> None:
        self.port, self.secret, self.store, self.key_id = port, secret, store, key_id
        self.url = f"http://127.0.0.1:{port}"

    def connect(self, timeout: float = 10.0) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        headers = {"authorization": f"Bearer {self.secret}"}
        return httpx.post(self.url + path, json=body, headers=headers, timeout=30)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.secret, max_retries=0)


def _gateway(tmp: Path, backend_port: int, limits: dict[str, Any] | None = None) -> Iterator[Any]:
    store = InferenceStore(tmp)
    key, secret = store.create_key("edge", "client")
    settings: dict[str, Any] = {"backend_url": f"http://127.0.0.1:{backend_port}"}
    if limits is not None:
        settings["limits"] = limits
    port = free_port()
    with running(start_gateway(tmp, port, settings)):
        yield Gateway(port, secret, store, key.id)


@pytest.fixture(scope="module")
def backend() -> Iterator[int]:
    port = free_port()
    with running(start_fake_vllm(port, args=["--max-model-len", "64"])):
        yield port


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, backend: int) -> Iterator[Gateway]:
    """Default limits."""
    yield from _gateway(tmp_path_factory.mktemp("gw"), backend)


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory, backend: int) -> Iterator[Gateway]:
    yield from _gateway(tmp_path_factory.mktemp("tight"), backend, TIGHT)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    body = resp.read()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


def assert_openai_error(status: int, headers: dict[str, str], body: bytes, want: int) -> dict:
    assert status == want, (status, body[:300])
    assert headers.get("content-type", "").startswith("application/json"), headers
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] in OPENAI_TYPES and error["message"], error
    return error


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the server has closed its side (EOF or reset), whatever it sent before."""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def request_head(gw: Gateway, extra: str = "") -> bytes:
    return (
        f"POST {CHAT} HTTP/1.1\r\nhost: inference.local\r\n"
        f"authorization: Bearer {gw.secret}\r\ncontent-type: application/json\r\n{extra}\r\n"
    ).encode()


# -- bodies over the cap -------------------------------------------------------------------


def test_chunked_body_over_the_cap_is_413_before_it_ends(gw: Gateway) -> None:
    """33 MiB in 1 MiB chunks and no final chunk: the answer must come once the cap is passed,
    not after the body ends (it never does); the old code read on and on, then said 400."""
    with gw.connect(timeout=15) as sock:
        sock.sendall(request_head(gw, "transfer-encoding: chunked\r\n"))
        piece = b"x" * (1024 * 1024)
        for _ in range(CAP // len(piece) + 1):
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        status, headers, body = read_response(sock)
    error = assert_openai_error(status, headers, body, 413)
    assert error["code"] == "request_too_large"


def test_chunked_body_just_over_the_cap_is_413(gw: Gateway) -> None:
    """One byte past the cap, complete chunked body, in chunks of odd sizes."""
    with gw.connect(timeout=15) as sock:
        sock.sendall(request_head(gw, "transfer-encoding: chunked\r\n"))
        left, size = CAP + 1, 999_983
        while left:
            n = min(size, left)
            sock.sendall(b"%x\r\n%s\r\n" % (n, b"y" * n))
            left -= n
        sock.sendall(b"0\r\n\r\n")
        status, headers, body = read_response(sock)
    assert_openai_error(status, headers, body, 413)


def test_declared_length_over_the_cap_is_413_at_once(gw: Gateway) -> None:
    with gw.connect() as sock:
        sock.sendall(request_head(gw, f"content-length: {CAP + 1}\r\n"))
        status, headers, body = read_response(sock)
    assert_openai_error(status, headers, body, 413)


def test_a_body_at_the_cap_is_read(gw: Gateway) -> None:
    """Exactly the cap is allowed (and is then judged as JSON: 400, not 413)."""
    r = httpx.post(
        gw.url + CHAT,
        content=b" " * CAP,
        headers={"authorization": f"Bearer {gw.secret}", "content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text[:200]


# -- slowloris -------------------------------------------------------------------------------


def test_slowloris_headers_are_cut_off(tight: Gateway) -> None:
    """50 connections trickle header bytes and never finish: each is answered 408 and closed
    within the header timeout (the old gateway kept all of them open), while a normal request
    is still served."""
    socks = [tight.connect(timeout=0.2) for _ in range(50)]
    started = time.monotonic()
    try:
        head = request_head(tight)[:-2]  # every header but the blank line that ends them
        for i in range(12):  # a byte per connection every 0.25 s: never idle, never done
            for sock in socks:
                with contextlib.suppress(OSError):  # already closed: fine
                    sock.send(head[i : i + 1])
            time.sleep(0.25)
        assert tight.client().chat.completions.create(model="nemotron", messages=HI, max_tokens=1)
        deadline = started + TIGHT["header_timeout_s"] + 3
        open_ = [s for s in socks if not _wait_closed(s, deadline)]
        assert not open_, f"{len(open_)} of 50 half-sent connections still open"
    finally:
        for sock in socks:
            sock.close()


def test_slowloris_header_timeout_answers_408(tight: Gateway) -> None:
    with tight.connect(timeout=TIGHT["header_timeout_s"] + 5) as sock:
        sock.sendall(request_head(tight)[:-2])  # headers never end
        status, headers, body = read_response(sock)
    error = assert_openai_error(status, headers, body, 408)
    assert error["code"] == "request_timeout"


def test_slow_body_is_cut_off(tight: Gateway) -> None:
    """A body of 100 declared bytes sent at 4 bytes a second: 408 and closed at the body
    timeout (the old gateway read on for as long as the client cared to send)."""
    with tight.connect(timeout=0.25) as sock:
        sock.sendall(request_head(tight, "content-length: 100\r\n"))
        started, answered = time.monotonic(), b""
        while time.monotonic() - started < TIGHT["body_timeout_s"] + 5:
            try:
                sock.send(b"{")
                answered += sock.recv(65536)
                break  # the server answered (or closed: b"")
            except TimeoutError:
                continue
            except OSError:
                break
        elapsed = time.monotonic() - started
    assert answered.startswith(b"HTTP/1.1 408 "), answered[:200]
    assert elapsed < TIGHT["body_timeout_s"] + 2, elapsed
    assert b'"code":"request_timeout"' in answered.replace(b" ", b"")


def test_idle_after_headers_with_chunked_body_is_cut_off(tight: Gateway) -> None:
    with tight.connect(timeout=TIGHT["body_timeout_s"] + 5) as sock:
        sock.sendall(request_head(tight, "transfer-encoding: chunked\r\n") + b"2\r\n{}\r\n")
        status, headers, body = read_response(sock)
    assert_openai_error(status, headers, body, 408)


def _wait_closed(sock: socket.socket, deadline: float) -> bool:
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    return closed_by_peer(sock)


# -- connections per client address ---------------------------------------------------------


def test_connections_per_address_are_capped(tmp_path: Path, backend: int) -> None:
    """The 5th connection from one address while 4 are open is refused with an OpenAI-shaped
    429 and closed; once one closes, the address is served again."""
    limits = {"max_connections_per_client": 4, "header_timeout_s": 30}
    for gw in _gateway(tmp_path, backend, limits):
        held = [gw.connect() for _ in range(4)]
        try:
            with gw.connect() as fifth:
                fifth.sendall(b"GET /health/live HTTP/1.1\r\nhost: x\r\n\r\n")
                status, headers, body = read_response(fifth)
            error = assert_openai_error(status, headers, body, 429)
            assert error["code"] == "too_many_connections"
            held.pop().close()
            time.sleep(0.2)
            assert httpx.get(gw.url + "/health/live", timeout=5).status_code == 200
        finally:
            for sock in held:
                sock.close()


def test_connections_in_all_are_capped(tmp_path: Path, backend: int) -> None:
    limits = {"max_connections": 3, "header_timeout_s": 30}
    for gw in _gateway(tmp_path, backend, limits):
        held = [gw.connect() for _ in range(3)]
        try:
            with gw.connect() as fourth:
                status, headers, body = read_response(fourth)
            error = assert_openai_error(status, headers, body, 503)
            assert error["code"] == "too_many_connections"
        finally:
            for sock in held:
                sock.close()


# -- what the HTTP parser refuses -----------------------------------------------------------


def test_megabyte_authorization_header_is_json_431(gw: Gateway) -> None:
    with gw.connect() as sock:
        sock.sendall(
            f"POST {CHAT} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer ".encode()
            + b"k" * (1024 * 1024)
            + b"\r\ncontent-length: 2\r\n\r\n{}"
        )
        status, headers, body = read_response(sock)
    error = assert_openai_error(status, headers, body, 431)
    assert error["code"] == "headers_too_large"


def test_oversized_headers_in_one_read_are_431(gw: Gateway) -> None:
    """20 KB of headers sent at once: h11 alone would parse them (it only limits a header
    block still incomplete after a read)."""
    head = f"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-big: {'b' * 20_000}\r\n\r\n".encode()
    with gw.connect() as sock:
        sock.sendall(head)
        status, headers, body = read_response(sock)
    assert_openai_error(status, headers, body, 431)


def test_headers_under_the_limit_pass(gw: Gateway) -> None:
    r = httpx.get(gw.url + "/v1/models", headers={"x-pad": "p" * 12_000, "authorization": "x"})
    assert r.status_code == 401


def test_garbage_request_is_json_400(gw: Gateway) -> None:
    with gw.connect() as sock:
        sock.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
        status, headers, body = read_response(sock)
    error = assert_openai_error(status, headers, body, 400)
    assert error["code"] == "invalid_http"


def test_bad_chunk_framing_is_json_400(gw: Gateway) -> None:
    with gw.connect() as sock:
        sock.sendall(request_head(gw, "transfer-encoding: chunked\r\n") + b"zz\r\n{}\r\n0\r\n\r\n")
        status, headers, body = read_response(sock)
    error = assert_openai_error(status, headers, body, 400)
    assert error["code"] == "invalid_http"


# -- field ranges: refused by the gateway, not by a 500 from the backend -----------------------

BAD_FIELDS = [
    (CHAT, "seed", 10**40),
    (CHAT, "seed", -(2**63) - 1),
    (CHAT, "n", 0),
    (CHAT, "n", 129),
    (CHAT, "temperature", -0.5),
    (CHAT, "temperature", 2.5),
    (CHAT, "top_p", 0),
    (CHAT, "top_p", 1.01),
    (CHAT, "max_tokens", 2**31),
    (CHAT, "max_completion_tokens", 0),
    (CHAT, "presence_penalty", 2.5),
    (CHAT, "frequency_penalty", -2.5),
    (CHAT, "logprobs", 5),
    (CHAT, "top_logprobs", 21),
    (CHAT, "top_logprobs", -1),
    (CHAT, "stop", [""]),
    (CHAT, "stop", ["s"] * 65),
    (CHAT, "top_k", -2),
    (CHAT, "min_p", 1.5),
    (CHAT, "repetition_penalty", 0),
    (CHAT, "min_tokens", -1),
    (CHAT, "logit_bias", {"not-a-token": 1}),
    (CHAT, "logit_bias", {"5": 101}),
    (CHAT, "stop_token_ids", [-1]),
    ("/v1/completions", "logprobs", 21),
    ("/v1/completions", "prompt", [-1, 5]),
    ("/v1/completions", "prompt", [2**40]),
    ("/v1/completions", "prompt", []),
    ("/v1/completions", "best_of", 0),
    ("/v1/completions", "echo", "yes"),
]


@pytest.mark.parametrize(("path", "field", "value"), BAD_FIELDS)
def test_out_of_range_fields_are_400(gw: Gateway, path: str, field: str, value: Any) -> None:
    base: dict[str, Any] = {"model": "nemotron", "max_tokens": 2}
    base |= {"messages": HI} if path == CHAT else {"prompt": "hi"}
    r = gw.post(path, {**base, field: value})
    error = assert_openai_error(r.status_code, dict(r.headers), r.content, 400)
    assert error["param"] is not None and error["param"].split(".")[0] == field, error


def test_edge_values_that_vllm_accepts_pass(gw: Gateway) -> None:
    body = {
        "model": "nemotron",
        "messages": HI,
        "max_tokens": 2,
        "seed": 2**63 - 1,
        "temperature": 0,
        "top_p": 1,
        "top_k": -1,
        "n": 1,
        "logprobs": True,
        "top_logprobs": 20,
        "stop": ["zz"],
        "logit_bias": {"5": -100},
    }
    r = gw.post(CHAT, body)
    assert r.status_code == 200, r.text


# -- the backend's errors, in OpenAI's types --------------------------------------------------


def test_backend_errors_carry_openai_types(gw: Gateway) -> None:
    """The stand-in vLLM (max_model_len 64) answers a too-long request with vLLM's own error
    type, `BadRequestError`; the client sees OpenAI's."""
    with pytest.raises(openai.BadRequestError) as err:
        gw.client().completions.create(model="nemotron", prompt="a " * 60, max_tokens=30)
    assert err.value.body["type"] == "invalid_request_error", err.value.body
    assert "maximum context length" in err.value.body["message"]


def test_dead_engine_500_is_a_server_error(tmp_path: Path) -> None:
    bport = free_port()
    backend = start_fake_vllm(bport)
    with running(backend):
        for gw in _gateway(tmp_path, bport):
            backend.send_signal(signal.SIGUSR1)  # vLLM's engine died: /v1 answers 500
            with pytest.raises(openai.InternalServerError) as err:
                gw.client().chat.completions.create(model="nemotron", messages=HI)
            body = err.value.body
            assert isinstance(body, dict) and body["type"] == "server_error", body
            assert set(body) == {"message", "type", "param", "code"}


def test_upstream_refusing_the_gateways_key_is_a_502(tmp_path: Path) -> None:
    """An upstream that refuses the gateway's credentials answers 401 in vLLM's own shape
    ({"error": "Unauthorized"}); passing that on would tell the client its key is wrong."""
    uport, gport = free_port(), free_port()
    store = InferenceStore(tmp_path)
    _, secret = store.create_key("roamer", "client")
    settings = {
        "backend_url": f"http://127.0.0.1:{free_port()}",
        "upstream": {
            "base_url": f"http://127.0.0.1:{uport}/v1",
            "api_key_env": "TEST_UPSTREAM_KEY",
            "models": ["remote/model"],
        },
    }
    upstream = start_fake_vllm(uport, {"VLLM_API_KEY": "right"}, name="remote/model")
    gateway = start_gateway(tmp_path, gport, settings, env={"TEST_UPSTREAM_KEY": "wrong"})
    with running(upstream), running(gateway):
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{gport}/v1", api_key=secret, max_retries=0)
        with pytest.raises(openai.APIStatusError) as err:
            c.chat.completions.create(model="remote/model", messages=HI)
    assert err.value.status_code == 502
    assert err.value.body["type"] == "server_error", err.value.body
    assert err.value.body["code"] == "backend_auth_failed"
