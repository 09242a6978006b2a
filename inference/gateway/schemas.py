"""The request schema the gateway checks before forwarding.

What the gateway relies on (model, messages/prompt, stream flags) and every sampling field whose
range vLLM checks is validated here, to the ranges vLLM accepts (OpenAI's where they are
narrower), so a bad value is an OpenAI-shaped 400 naming the field rather than a backend error
or crash (a `seed` past 64 bits made the backend answer 500). Every other field passes through
untouched (tools, tool_choice, response_format, other extra_body knobs...).
Strict mode: a string "true" is not a bool and "5" is not an int, as in OpenAI's API.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
)

INT32_MAX = 2**31 - 1  # token counts and ids: no model comes near it
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # vLLM's seed is a signed 64-bit integer
MAX_LOGPROBS = 20  # vLLM's default --max-logprobs, and OpenAI's top_logprobs limit
MAX_STOP = 64  # stop strings per request (OpenAI: 4; vLLM: unbounded, each one costs a scan)

TokenId = Annotated[StrictInt, Field(ge=0, le=INT32_MAX)]
Count = Annotated[StrictInt, Field(ge=1, le=INT32_MAX)]
Number = float  # strict: an int is a float too (JSON has one number type), a bool is not
StopText = Annotated[StrictStr, Field(min_length=1)]  # vLLM: "stop cannot contain an empty string"


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class StreamOptions(_Open):
    include_usage: StrictBool | None = None


class Message(_Open):
    role: StrictStr = Field(min_length=1)


def _range(lo: float | None = None, hi: float | None = None, gt: float | None = None) -> Any:
    return Field(None, ge=lo, le=hi, gt=gt)


class _Sampling(_Open):
    model: StrictStr = Field(min_length=1, max_length=256)
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: Count | None = None
    temperature: Number | None = _range(0, 2)
    top_p: Number | None = _range(hi=1, gt=0)  # vLLM: 0 < top_p <= 1
    n: StrictInt | None = _range(1, 128)
    presence_penalty: Number | None = _range(-2, 2)
    frequency_penalty: Number | None = _range(-2, 2)
    seed: StrictInt | None = _range(INT64_MIN, INT64_MAX)
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP)] | None = None
    # token id (as a string, OpenAI's shape) -> bias in [-100, 100]
    logit_bias: (
        Annotated[
            dict[
                Annotated[StrictStr, Field(pattern=r"^[0-9]{1,10}$")],
                Annotated[Number, Field(ge=-100, le=100)],
            ],
            Field(max_length=1024, json_schema_extra={"additionalProperties": False}),
        ]
        | None
    ) = None
    user: StrictStr | None = None
    # vLLM's own sampling knobs (OpenAI clients send them in extra_body)
    top_k: StrictInt | None = _range(-1, INT32_MAX)  # -1 or 0: off
    min_p: Number | None = _range(0, 1)
    repetition_penalty: Number | None = _range(hi=2**31, gt=0)
    min_tokens: StrictInt | None = _range(0, INT32_MAX)
    stop_token_ids: list[TokenId] | None = Field(None, max_length=1024)
    ignore_eos: StrictBool | None = None
    prompt_logprobs: StrictInt | None = _range(0, MAX_LOGPROBS)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Count | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = _range(0, MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None


class CompletionRequest(_Sampling):
    prompt: (
        StrictStr
        | Annotated[list[StrictStr], Field(min_length=1)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]
    )
    logprobs: StrictInt | None = _range(0, MAX_LOGPROBS)
    echo: StrictBool | None = None
    best_of: StrictInt | None = _range(1, 128)
    suffix: StrictStr | None = None


def _is_tag(part: int | str) -> bool:
    """A union member's or a dict key's tag in an error location (`list[int]`, `str`, `[key]`),
    not a step of the field's path."""
    return isinstance(part, str) and (
        any(c in part for c in "[]-") or part in {"str", "int", "float", "bool"}
    )


def validation_error_message(exc: ValidationError) -> tuple[str, str | None]:
    """One readable line and the offending parameter, for the OpenAI error body. Of the errors
    on the first bad field, the deepest says most (for a union, the member that got furthest:
    `prompt.0: must be >= 0` rather than `prompt: must be a string`)."""
    errors = exc.errors()
    field = errors[0]["loc"][:1]
    on_field = [e for e in errors if e["loc"][:1] == field]
    # deepest first, then a broken constraint over a wrong type; ties: the last member
    best = max(reversed(on_field), key=lambda e: (len(e["loc"]), not e["type"].endswith("_type")))
    param = ".".join(str(p) for p in best["loc"] if not _is_tag(p)) or None
    return (f"{param}: {best['msg']}" if param else best["msg"]), param
