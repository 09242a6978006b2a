"""The gateway's error shapes and types, and its listener limits as configuration."""

from __future__ import annotations

import json

import h11
import pytest

from appliance.config import ApplianceConfig
from inference.gateway.errors import ERROR_TYPES, backend_error, raw_error_response
from inference.gateway.settings import ListenerLimits
from inference.gateway.sse import SSEMeter


@pytest.mark.parametrize(
    ("status", "content", "want_status", "want_type", "want_code", "in_message"),
    [
        # vLLM's own error types become OpenAI's
        (
            400,
            b'{"error": {"message": "max_tokens too big", "type": "BadRequestError",'
            b' "param": "max_tokens", "code": 400}}',
            400,
            "invalid_request_error",
            None,
            "max_tokens too big",
        ),
        (
            404,
            b'{"error": {"message": "no model", "type": "NotFoundError", "code": 404}}',
            404,
            "invalid_request_error",
            None,
            "no model",
        ),
        (
            500,
            b'{"error": {"message": "EngineCore died", "type": "InternalServerError"}}',
            500,
            "server_error",
            None,
            "EngineCore died",
        ),
        (429, b'{"error": {"message": "slow down"}}', 429, "rate_limit_error", None, "slow down"),
        # another shape: vLLM's 401, FastAPI's detail, plain text
        (401, b'{"error": "Unauthorized"}', 502, "server_error", "backend_auth_failed", "Unauth"),
        (403, b"forbidden", 502, "server_error", "backend_auth_failed", "forbidden"),
        (422, b'{"detail": "bad field"}', 422, "invalid_request_error", None, "bad field"),
        (500, b"Internal Server Error", 500, "server_error", None, "Internal Server Error"),
        (502, b"", 502, "server_error", None, "Bad Gateway"),
        (400, b"[1, 2]", 400, "invalid_request_error", None, "[1, 2]"),
    ],
)
def test_backend_errors_are_retyped(
    status: int,
    content: bytes,
    want_status: int,
    want_type: str,
    want_code: str | None,
    in_message: str,
) -> None:
    out_status, out = backend_error(status, content)
    error = json.loads(out)["error"]
    assert out_status == want_status
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == want_type and error["type"] in ERROR_TYPES
    assert error["code"] == want_code
    assert in_message in error["message"]


def test_backend_param_is_kept_when_it_is_a_name() -> None:
    _, out = backend_error(400, b'{"error": {"message": "m", "param": "seed", "code": "x"}}')
    assert json.loads(out)["error"]["param"] == "seed"
    assert json.loads(out)["error"]["code"] == "x"


@pytest.mark.parametrize("status", [400, 408, 413, 429, 431, 503])
def test_raw_error_response_is_valid_http(status: int) -> None:
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(raw_error_response(status, "why", "code_x"))
    response = client.next_event()
    assert isinstance(response, h11.Response) and response.status_code == status
    assert (b"connection", b"close") in response.headers
    body = client.next_event()
    assert isinstance(body, h11.Data)
    assert json.loads(body.data)["error"]["code"] == "code_x"
    assert isinstance(client.next_event(), h11.EndOfMessage)


def test_limits_are_configurable_and_reach_the_gateway() -> None:
    config = ApplianceConfig.model_validate(
        {"gateway": {"limits": {"header_timeout_s": 3, "max_connections_per_client": 32}}}
    )
    limits = config.gateway_settings().limits
    assert limits.header_timeout_s == 3 and limits.max_connections_per_client == 32
    assert limits.max_body_bytes == ListenerLimits().max_body_bytes == 32 * 1024 * 1024


def test_limits_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="header_timeout_s"):
        ListenerLimits.model_validate({"header_timeout_s": 0})
    with pytest.raises(ValueError, match="max_body"):
        ListenerLimits.model_validate({"max_body_bytes_typo": 1})


def test_a_backend_error_event_mid_stream_is_retyped() -> None:
    meter = SSEMeter(client_wants_usage=False, chat=True)
    token = b'data: {"choices": [{"delta": {"content": "say \\"error\\""}}]}\n\n'
    vllm = (
        b'data: {"error": {"object": "error", "message": "engine hiccup",'
        b' "type": "InternalServerError", "param": null, "code": 500}}\n\n'
    )
    assert meter.feed(token) == token  # content that mentions "error" passes as it is
    out = meter.feed(vllm)
    error = json.loads(out.removeprefix(b"data: "))["error"]
    assert error == {
        "message": "the inference backend failed: engine hiccup",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    bad = b'data: {"error": {"message": "top_k", "type": "BadRequestError", "code": 400}}\n\n'
    assert json.loads(meter.feed(bad)[6:])["error"]["type"] == "invalid_request_error"
