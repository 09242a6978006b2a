"""Chat-template fields a caller may send: none that change the template itself.

vLLM (and the embedded server) render `chat_template` and every `chat_template_kwargs` entry
into the prompt. A caller's template breaks the prompt's upper bound (prompt_bound.py: a
50-character template expanded to 15,000 characters) and a template with nested loops can hold
a tokenizer worker for as long as it likes. So a caller's `chat_template` (top-level or inside
`chat_template_kwargs`) is refused, and `chat_template_kwargs` may hold only the switches the
served models' own templates read, with short values: Nemotron's `enable_thinking` (REFERENCE
§1), `thinking` (other reasoning templates) and `reasoning_effort`.
"""

from __future__ import annotations

from typing import Any

from inference.gateway.errors import GatewayError

REASONING_EFFORTS = ("low", "medium", "high")
ALLOWED_KWARGS = ("enable_thinking", "thinking", "reasoning_effort")


def check_template_fields(body: dict[str, Any]) -> None:
    """400 (OpenAI-shaped, naming the field) for a template the caller supplies or a template
    keyword outside the allowlist."""
    if body.get("chat_template") is not None:
        raise _refused(
            "chat_template",
            "chat_template: a caller's chat template is not accepted; the model's own is used",
        )
    kwargs = body.get("chat_template_kwargs")
    if kwargs is None:
        return
    if not isinstance(kwargs, dict):
        raise _refused("chat_template_kwargs", "chat_template_kwargs: must be an object")
    for name, value in kwargs.items():
        if name not in ALLOWED_KWARGS:
            raise _refused(
                "chat_template_kwargs",
                f"chat_template_kwargs: {name[:64]!r} is not accepted; allowed: "
                f"{', '.join(ALLOWED_KWARGS)}",
            )
        ok = value in REASONING_EFFORTS if name == "reasoning_effort" else isinstance(value, bool)
        if not ok:
            wanted = " | ".join(REASONING_EFFORTS) if name == "reasoning_effort" else "a boolean"
            raise _refused("chat_template_kwargs", f"chat_template_kwargs.{name}: must be {wanted}")


def _refused(param: str, message: str) -> GatewayError:
    return GatewayError(400, message, "invalid_request", param)
