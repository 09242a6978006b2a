"""The chat-template switches a caller may set (`chat_template_kwargs`), shared by the gateway
and the embedded server: only those the served models' own templates read, with short values.

Anything else is refused, a caller's `chat_template` above all: a template (or a keyword a
template renders) breaks the gateway's upper bound on a prompt's tokens (a 50-character template
expanded to 15,000 characters) and one with nested loops holds a tokenizer worker as long as it
likes. Nemotron's templates read `enable_thinking` (REFERENCE §1); `thinking` and
`reasoning_effort` are what other reasoning templates read.
"""

from __future__ import annotations

from typing import Any

REASONING_EFFORTS = ("low", "medium", "high")
ALLOWED = ("enable_thinking", "thinking", "reasoning_effort")


def problem(kwargs: Any) -> str | None:
    """Why `kwargs` (a request's chat_template_kwargs) is refused; None: it may pass."""
    if kwargs is None:
        return None
    if not isinstance(kwargs, dict):
        return "chat_template_kwargs: must be an object"
    for name, value in kwargs.items():
        if name not in ALLOWED:
            shown = str(name)[:64]
            return f"chat_template_kwargs: {shown!r} is not accepted; allowed: {', '.join(ALLOWED)}"
        if name == "reasoning_effort":
            if value not in REASONING_EFFORTS:
                return f"chat_template_kwargs.{name}: must be {' | '.join(REASONING_EFFORTS)}"
        elif not isinstance(value, bool):
            return f"chat_template_kwargs.{name}: must be a boolean"
    return None
