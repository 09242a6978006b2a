"""The gateway's error answers, declared in its OpenAPI document.

Every operation lists the errors it can answer, all with one schema (OpenAI's error object), so
a client generator (or schemathesis, in the test tier) knows every status and shape to expect.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from inference.gateway.errors import ERROR_TYPES

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string", "enum": sorted(ERROR_TYPES)},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

# What the listener may answer on any request (inference.gateway.server), and FastAPI's own.
_ANY = {
    400: "Malformed HTTP request",
    405: "Method not allowed on this route",
    408: "Headers or body not received in time",
    429: "Too many connections from this address",
    431: "Request headers too large",
    503: "Too many open connections",
}
_V1 = {
    400: "Invalid request: malformed JSON, or a field out of range (`param` names it)",
    401: "Missing, malformed or revoked API key",
    403: "The key may not use this model",
    404: "Unknown model",
    413: "Request body over the cap",
    429: "A budget is spent (`insufficient_quota`), or too many connections",
    500: "The backend failed",
    502: "The backend failed while answering, or refused the gateway's credentials",
    503: "The inference backend is down (and no fallback)",
    504: "The inference backend timed out",
}
_KEYED = {401: _V1[401], 403: "The key lacks the scope this route needs"}
_READY = {503: "The local backend does not answer its /health"}


def _errors_for(path: str, method: str) -> dict[int, str]:
    if path.startswith("/v1/") and method == "post":
        return {**_ANY, **_V1}
    if path == "/health/ready":
        return {**_ANY, **_READY}
    if path.startswith("/health/"):
        return dict(_ANY)
    return {**_ANY, **_KEYED}


def declare_errors(app: FastAPI) -> None:
    """Make `app.openapi()` list each operation's error responses with OpenAI's error schema."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        schema.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
        ref = {"$ref": "#/components/schemas/Error"}
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                responses = operation.setdefault("responses", {})
                if path == "/metrics" and "200" in responses:  # Prometheus' text format
                    responses["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
                if path.startswith("/v1/") and method == "post" and "200" in responses:
                    content = responses["200"].setdefault("content", {})
                    content["text/event-stream"] = {}  # stream: true; events are chunks
                for status, description in sorted(_errors_for(path, method).items()):
                    responses.setdefault(
                        str(status),
                        {
                            "description": description,
                            "content": {"application/json": {"schema": ref}},
                        },
                    )
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
