"""Errors in OpenAI's JSON shape, so every OpenAI client maps them to its own exception types.

Every error the gateway sends, whether from a handler, the listener (`server.py`: timeouts,
oversized headers, connection caps) or passed on from a backend, is
`{"error": {"message", "type", "param", "code"}}` with `type` one of `ERROR_TYPES` — never a
backend's own (vLLM says `BadRequestError`) and never plain text.
"""

from __future__ import annotations

import http
import json
from typing import Any

from starlette.responses import Response

# status -> OpenAI error type. OpenAI itself answers unknown routes and models (404) with
# invalid_request_error; a budget that is spent is insufficient_quota, as OpenAI's is.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "insufficient_quota",
    431: "invalid_request_error",
    499: "invalid_request_error",
}
ERROR_TYPES = frozenset(
    {*_TYPES.values(), "rate_limit_error", "server_error"}  # every type the gateway sends
)


def error_type(status: int) -> str:
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


class GatewayError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        type_: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}
        self.type = type_ or error_type(status)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> Response:
        return Response(
            json.dumps(self.body()),
            status_code=self.status,
            headers=self.headers,
            media_type="application/json",
        )


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def sse_error(message: str, type_: str = "server_error", code: str | None = None) -> bytes:
    """A final SSE event for a stream that broke after its 200 headers went out."""
    return b"data: " + json.dumps(error_body(message, type_, None, code)).encode() + b"\n\n"


def raw_error_response(
    status: int, message: str, code: str, type_: str | None = None, close: bool = True
) -> bytes:
    """A whole HTTP/1.1 error response as bytes, for the listener to write on a connection it
    is refusing before (or instead of) any request handler."""
    body = json.dumps(error_body(message, type_ or error_type(status), None, code)).encode()
    reason = _phrase(status)
    head = [
        f"HTTP/1.1 {status} {reason}",
        "content-type: application/json",
        f"content-length: {len(body)}",
    ]
    if close:
        head.append("connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def backend_error(status: int, content: bytes) -> tuple[int, bytes]:
    """A backend's error answer, re-typed as OpenAI's: vLLM's `BadRequestError` becomes
    `invalid_request_error`, a body in another shape keeps its text as the message, and a
    backend (or upstream) that refuses the gateway's own credentials is the gateway's failure
    (502), not the client's key being wrong."""
    message, param, code = "", None, None
    try:
        raw = json.loads(content)
        error = raw.get("error") if isinstance(raw, dict) else None
        if isinstance(error, dict):
            message = str(error.get("message") or "")
            param = error.get("param") if isinstance(error.get("param"), str) else None
            code = error.get("code") if isinstance(error.get("code"), str) else None
        elif isinstance(error, str):
            message = error
        elif isinstance(raw, dict) and isinstance(raw.get("detail"), str):
            message = raw["detail"]  # FastAPI's own errors
    except (ValueError, RecursionError):
        pass
    if not message:
        message = content.decode(errors="replace")[:500] or _phrase(status)
    if status in (401, 403):
        status, code = 502, "backend_auth_failed"
        message = f"the inference backend refused the gateway's credentials: {message}"
    elif status >= 500:
        message = f"the inference backend failed: {message}"
    type_ = "rate_limit_error" if status == 429 else error_type(status)
    return status, json.dumps(error_body(message, type_, param, code)).encode()
