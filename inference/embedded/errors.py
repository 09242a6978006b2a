"""The errors the engine and the server raise; `status` is the HTTP status the server answers."""

from __future__ import annotations


class EngineError(RuntimeError):
    """Base of the errors `submit` raises; `status` is the HTTP status the server answers with."""

    status = 500


class EngineOverloaded(EngineError):
    status = 503


class EngineDead(EngineError):
    status = 503


class InvalidRequest(EngineError, ValueError):
    status = 400


def context_error(
    max_len: int, prompt: int, max_tokens: int | None, *, at_least: bool = False
) -> InvalidRequest:
    """vLLM's wording, which clients (and people) grep for. `at_least`: `prompt` is a proven
    lower bound on the prompt's tokens (refused without tokenizing it)."""
    if max_tokens is None:
        return InvalidRequest(
            f"This model's maximum context length is {max_len} tokens. However, your request "
            f"has {'at least ' if at_least else ''}{prompt} input tokens. Please reduce the "
            "length of the input messages."
        )
    return InvalidRequest(
        f"This model's maximum context length is {max_len} tokens. However, you requested "
        f"{prompt + max_tokens} tokens ({prompt} in the messages, {max_tokens} in the "
        f"completion). Please reduce the length of the messages or completion."
    )
