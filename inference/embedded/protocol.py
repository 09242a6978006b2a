"""Request bodies of the OpenAI/vLLM routes, validated with pydantic.

Like vLLM, unknown fields are accepted and ignored (clients send many OpenAI options), while the
fields we use are type-checked: a bad type is a 400, never a 500.

Validation runs on the event loop and holds the GIL, so its cost must stay small whatever the body
(up to the gateway's 32 MB). A pydantic list checks every item and makes one error per bad item,
each union member again: a 24 MB `stop` or `prompt` list of the wrong type meant millions of
errors and minutes with /health silent. So every list or dict is refused above MAX_ITEMS before
its items are looked at, and token-id lists and the prompt's four shapes are checked in one pass
that stops at the first bad item.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, model_validator

from inference.embedded.sampling import SamplingParams

MAX_ITEMS = 16_384  # items in any list of a request but a prompt's token ids: more cannot fit
MAX_TOKEN_IDS = 1 << 20  # token ids in one list (beyond any context served here)


def _at_most(limit: int) -> BeforeValidator:
    def check(value: Any) -> Any:
        if isinstance(value, list | dict) and len(value) > limit:
            raise ValueError(f"at most {limit} items, not {len(value)}")
        return value

    return BeforeValidator(check)


def _ids(value: Any) -> list[int]:
    """A list of token ids, checked in one pass (up to the first bad item)."""
    if not isinstance(value, list) or len(value) > MAX_TOKEN_IDS:
        raise ValueError(f"must be a list of at most {MAX_TOKEN_IDS} token ids")
    if not all(type(x) is int for x in value):
        raise ValueError("token ids must be integers")
    return value


Capped = _at_most(MAX_ITEMS)
TokenIds = Annotated[list[int], PlainValidator(_ids, json_schema_input_type=list[int])]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Open):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class TextPart(_Open):
    type: str
    text: str | None = None


class ChatMessage(_Open):
    role: str
    content: Annotated[str | list[TextPart] | None, Capped] = None
    name: str | None = None
    tool_calls: Annotated[list[dict[str, Any]] | None, Capped] = None
    tool_call_id: str | None = None

    def for_template(self) -> dict[str, Any]:
        """A plain dict for the chat template: text parts joined, None content as ""."""
        msg = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            msg["content"] = "\n".join(p.text or "" for p in self.content if p.type == "text")
        elif self.content is None:
            msg["content"] = ""
        return msg


NonNegFloat = Annotated[float, Field(ge=0.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class _Sampling(_Open):
    model: str | None = None
    n: Annotated[int, Field(ge=1, le=16)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: NonNegFloat | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: int | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    seed: int | None = None
    stop: Annotated[str | list[str] | None, Capped] = None
    stop_token_ids: TokenIds | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0)] = 0
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = None
    logit_bias: Annotated[dict[str, float] | None, Capped] = None
    skip_special_tokens: bool = True
    user: str | None = None

    def sampling(self, max_tokens: int | None, default_temperature: float = 1.0) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        try:
            bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        except ValueError as exc:
            raise ValueError(f"logit_bias keys must be token ids: {exc}") from exc
        return SamplingParams(
            max_tokens=max_tokens,  # type: ignore[arg-type]  # None: the engine fills it in
            temperature=default_temperature if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            seed=self.seed,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            logit_bias=bias,
            skip_special_tokens=self.skip_special_tokens,
        )


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1), Capped]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    tools: Annotated[list[dict[str, Any]] | None, Capped] = None
    tool_choice: Any = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


Prompt = str | list[str] | list[int] | list[list[int]]
_PROMPT_SHAPES = "a string, a list of strings, a list of token ids or a list of lists of token ids"


def _prompt(value: Any) -> Prompt:
    """One of the four shapes, told apart by the first item, checked in one pass."""
    if isinstance(value, str) or value == []:
        return value  # (an empty list is refused below, with its own message)
    if isinstance(value, list):
        head = value[0]
        if isinstance(head, str):
            if len(value) <= MAX_ITEMS and all(type(x) is str for x in value):
                return value
        elif isinstance(head, list):
            if len(value) <= MAX_ITEMS and all(type(x) is list for x in value):
                return [_ids(x) for x in value]
        elif len(value) <= MAX_TOKEN_IDS and all(type(x) is int for x in value):
            return value
    raise ValueError(
        f"prompt must be {_PROMPT_SHAPES} (at most {MAX_ITEMS} prompts, {MAX_TOKEN_IDS} ids each)"
    )


class CompletionRequest(_Sampling):
    prompt: Annotated[Prompt, PlainValidator(_prompt, json_schema_input_type=Prompt)]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default for completions
    echo: bool = False
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _non_empty(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be an empty list")
        return self


class TokenizeRequest(_Open):
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage] | None, Capped] = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_of(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        return self


class DetokenizeRequest(_Open):
    model: str | None = None
    tokens: TokenIds
