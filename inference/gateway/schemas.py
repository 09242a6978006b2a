"""The minimal request schema the gateway checks before forwarding.

Only what the gateway itself relies on (model, messages/prompt, stream flags, number ranges) is
validated; every other field passes through untouched (tools, tool_choice, extra_body knobs...).
Strict mode: a string "true" is not a bool and "5" is not an int, as in OpenAI's API.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class StreamOptions(_Open):
    include_usage: StrictBool | None = None


class Message(_Open):
    role: StrictStr = Field(min_length=1)


class _Sampling(_Open):
    model: StrictStr = Field(min_length=1, max_length=256)
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1, le=128)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    stop: StrictStr | list[StrictStr] | None = None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict[str, Any]] | None = None


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictStr] | list[int] | list[list[int]]


def validation_error_message(exc: ValidationError) -> tuple[str, str | None]:
    """One readable line and the offending parameter, for the OpenAI error body."""
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    return (f"{param}: {first['msg']}" if param else first["msg"]), param
