"""Bounds on a request's prompt tokens, from the body alone (no tokenizer on the hot path).

Upper bound (what a reservation holds; it must never undercount): the length of the body as
compact JSON with ASCII escapes, plus a fixed allowance for the chat template. Why it holds for
byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3, Nemotron) that do no expanding
normalisation: every token covers at least one byte of the text it encodes; every string of
the body appears in that JSON with at least as many characters as its UTF-8 bytes (escapes are
longer: `\\u00e9` is 6 characters for 2 bytes, a surrogate pair 12 for 4); a token-id prompt
costs at least one digit and a comma per id; and each message's JSON frame
(`{"role":"user","content":""}`, 28 characters) outweighs the few tokens its template adds
(`<|im_start|>user\\n ... <|im_end|>\\n`). What is left is the template's fixed text (a default
system prompt, the tool preamble), which `prompt_overhead_tokens` covers.
tests/unit/test_prompt_bound.py checks the bound against the embedded model's tokenizer.

Lower bound (for refusing what cannot fit the context without forwarding it): no token covers
more than MAX_TOKEN_BYTES bytes, and a string has at least as many bytes as characters, so a
prompt has at least characters / MAX_TOKEN_BYTES tokens (a token-id list: exactly its length).
"""

from __future__ import annotations

import json
from typing import Any

# No token of a vocabulary we serve is longer (SmolLM2's longest: 81 bytes, a newline and 80
# spaces; tiktoken-style vocabularies: runs of spaces or dashes of at most 128). Generous, so the
# refusal stays provable for models not measured here.
MAX_TOKEN_BYTES = 256


def upper_bound(body: dict[str, Any], overhead: int) -> int:
    """At most this many prompt tokens, summed over every prompt of the request."""
    return len(json.dumps(body, separators=(",", ":"))) + overhead


def choices(body: dict[str, Any]) -> int:
    """How many completions the request generates: n (or vLLM's best_of) per prompt."""
    n = max(_int(body.get("n")), _int(body.get("best_of")))
    prompt = body.get("prompt")
    prompts = 1
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompts = len(prompt)  # a list of strings or of token-id lists: one answer each
    return n * prompts


COMPLETION_FIELDS = ("max_tokens", "max_completion_tokens")


def completion_bound(body: dict[str, Any]) -> int | None:
    """The most completion tokens per choice the body allows; None: neither field is set.
    The larger of the two fields: backends read one or the other (vLLM's chat prefers
    max_completion_tokens, its completions and the embedded server read only max_tokens)."""
    values = [body.get(field) for field in COMPLETION_FIELDS]
    valid = [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 1]
    return max(valid) if valid else None


def lower_bound(body: dict[str, Any]) -> int:
    """At least this many tokens in the longest single prompt of the request."""
    if "messages" in body:
        chars = sum(_chars(m.get("content")) for m in body["messages"] if isinstance(m, dict))
        return _ceil_div(chars, MAX_TOKEN_BYTES)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return _ceil_div(len(prompt), MAX_TOKEN_BYTES)
    if isinstance(prompt, list) and prompt:
        if isinstance(prompt[0], int):
            return len(prompt)  # token ids: the count itself
        return max(
            len(p) if isinstance(p, list) else _ceil_div(_chars(p), MAX_TOKEN_BYTES) for p in prompt
        )
    return 0


def _chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):  # content parts: only the text ones are known to tokenize
        texts = (p.get("text") for p in content if isinstance(p, dict))
        return sum(len(t) for t in texts if isinstance(t, str))
    return 0


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 1 else 1


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
