"""Reading a request body: capped while it streams in, then parsed and checked against a schema.

The cap holds however the body is framed. A declared Content-Length over it is refused before
a byte is read; a chunked body (or one whose length was not declared) is counted as it arrives
and refused as soon as it passes the cap, so at most `max_bytes` + one network read is ever
buffered. What the client goes on sending after the 413 is read and dropped by the listener
(`server.py`), within the body timeout.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request

from inference.gateway.errors import GatewayError
from inference.gateway.schemas import validation_error_message


def too_large(max_bytes: int) -> GatewayError:
    return GatewayError(
        413,
        f"request body too large: the limit is {max_bytes} bytes",
        "request_too_large",
    )


async def read_capped(request: Request, max_bytes: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise too_large(max_bytes)
    received = bytearray()
    try:
        async for chunk in request.stream():
            received += chunk
            if len(received) > max_bytes:
                raise too_large(max_bytes)
    except ClientDisconnect:
        # Nobody will read the answer; 499 is what the ledger records for a client gone.
        raise GatewayError(
            499, "the client went away before sending the whole body", "client_disconnected"
        ) from None
    return bytes(received)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _number(text: str) -> float | int:
    """JSON has one number type: `5.0` is the integer 5 (as JSON Schema says), so it passes
    for `max_tokens` and is forwarded as `5`; a fraction stays a float."""
    value = float(text)
    return int(value) if value.is_integer() and abs(value) <= 2**63 else value


async def read_json_body(
    request: Request, schema: type[BaseModel], max_bytes: int
) -> dict[str, Any]:
    """The body as a JSON object that `schema` accepts, or an OpenAI-shaped 400/413."""
    raw = await read_capped(request, max_bytes)
    if not raw:
        raise GatewayError(400, "request body is empty; expected a JSON object")
    try:
        body = json.loads(raw, parse_constant=_reject_constant, parse_float=_number)
    except (ValueError, RecursionError) as exc:
        raise GatewayError(400, f"malformed JSON body: {exc}", "invalid_json") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "request body must be a JSON object", "invalid_request")
    try:
        schema.model_validate(body)
    except ValidationError as exc:
        message, param = validation_error_message(exc)
        raise GatewayError(400, message, "invalid_request", param) from None
    return body
