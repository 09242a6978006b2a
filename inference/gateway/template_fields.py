"""Chat-template fields a caller may send: none that change the template itself
(inference/template_kwargs.py says why and which switches pass)."""

from __future__ import annotations

from typing import Any

from inference import template_kwargs
from inference.gateway.errors import GatewayError


def check_template_fields(body: dict[str, Any]) -> None:
    """400 (OpenAI-shaped, naming the field) for a template the caller supplies or a template
    keyword outside the allowlist."""
    if body.get("chat_template") is not None:
        raise GatewayError(
            400,
            "chat_template: a caller's chat template is not accepted; the model's own is used",
            "invalid_request",
            "chat_template",
        )
    problem = template_kwargs.problem(body.get("chat_template_kwargs"))
    if problem is not None:
        raise GatewayError(400, problem, "invalid_request", "chat_template_kwargs")
