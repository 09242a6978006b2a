"""Requests' prompts as token ids, refused early when they cannot fit the context.

Tokenizing is the costly part of a huge prompt (about 1 s per MB here), so the server runs this
module on a worker thread (the tokenizer releases the GIL) and never on its event loop: /health
and the other requests carry on meanwhile. Before tokenizing, a prompt is checked against a proven
lower bound on its token count, so a 24 MB prompt for a 32K context is refused in microseconds.

The bound: with byte-level BPE and no normalizer (GPT-2's family: SmolLM2, Llama 3, Qwen), every
token stands for a run of the text's UTF-8 bytes, each byte in exactly one token, and no token
for more than the longest vocabulary entry's bytes (81 for SmolLM2). So tokens >= bytes / longest
>= characters / longest. One catch: a byte missing from the vocabulary is dropped without a token
(SmolLM2 lacks six ASCII control characters), so those characters are not counted; where a
UTF-8 continuation byte is missing no bound is claimed. For any other tokenizer no bound is claimed
either: it is tokenized (off the loop) and checked exactly.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from inference.embedded.errors import InvalidRequest, context_error
from inference.embedded.protocol import ChatCompletionRequest, CompletionRequest, TokenizeRequest

log = logging.getLogger("inference.embedded")

_SPLITTERS = {"ByteLevel", "Split", "Digits", "Punctuation"}  # split text; never drop or add bytes


@lru_cache(maxsize=1)
def _byte_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character that stands for each byte, to that byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


@dataclass(frozen=True)
class TokenBound:
    longest: int  # the most text bytes one token stands for
    dropped: str  # ASCII characters that tokenize to nothing (their byte has no token)

    def least_tokens(self, text: str) -> int:
        """A proven lower bound on `text`'s token count."""
        chars = len(text)  # <= its UTF-8 bytes; each character but `dropped` keeps >= 1 byte
        chars -= sum(text.count(c) for c in self.dropped)  # under 1 ms a MB each
        return -(-chars // self.longest)


def token_bound(tokenizer: Any) -> TokenBound | None:
    """The tokenizer's TokenBound, or None where no bound is provable."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        spec = json.loads(backend.to_str())
    except Exception:  # not a `tokenizers` tokenizer after all
        return None
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = {step.get("type") for step in steps}
    if (
        spec.get("normalizer") is not None
        or (spec.get("model") or {}).get("type") != "BPE"
        or "ByteLevel" not in kinds
        or not kinds <= _SPLITTERS
    ):
        return None
    byte_chars = _byte_chars()
    vocab = backend.get_vocab(with_added_tokens=False)  # byte-level strings
    added = [t.get("content") or "" for t in spec.get("added_tokens") or []]  # raw text
    missing = {b for c, b in byte_chars.items() if c not in vocab and c not in added}
    if spec["model"].get("unk_token") is not None and missing:
        return None  # an unknown token may stand for a run of bytes of any length
    if any(0x80 <= b < 0xC0 for b in missing):
        return None  # a multi-byte character might tokenize to nothing
    longest = max(
        max((sum(1 if c in byte_chars else 4 for c in t) for t in vocab), default=1),
        max((len(t.encode()) for t in added), default=1),
    )
    return TokenBound(longest, "".join(chr(b) for b in sorted(missing) if b < 0x80))


class PromptReader:
    """Turns request bodies into token ids for `engine`; run its methods on a worker thread."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.bound = token_bound(engine.tokenizer)
        log.info(
            "embedded: prompt lengths bounded before tokenizing: %s",
            f"at most {self.bound.longest} bytes a token" if self.bound else "no (not provable)",
        )

    def least_tokens(self, text: str) -> int:
        """A proven lower bound on `text`'s token count (0 where none is known)."""
        return self.bound.least_tokens(text) if self.bound else 0

    def check_fits(self, text: str, *, generating: bool = True) -> None:
        """InvalidRequest (vLLM's 400) when `text` alone cannot fit the context whatever it
        tokenizes to. Where it might, it is tokenized (bounded work: at most the context times the
        longest token) and the engine checks it with max_tokens, in vLLM's exact words.
        `generating`: a request, which needs room for one token more (vLLM's rule)."""
        least, limit = self.least_tokens(text), self.engine.max_model_len
        if least > limit or (generating and least == limit):
            raise context_error(limit, least, None, at_least=True)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        self.check_fits(text)
        return self.engine.encode(text, add_special_tokens=add_special_tokens)

    def chat(self, body: ChatCompletionRequest | TokenizeRequest) -> list[int]:
        messages = [m.for_template() for m in body.messages or []]
        if isinstance(body, TokenizeRequest):
            text = self.engine.chat_text(messages, add_generation_prompt=body.add_generation_prompt)
            self.check_fits(text, generating=False)
        else:
            text = self.engine.chat_text(
                messages,
                tools=body.tools,
                add_generation_prompt=body.add_generation_prompt,
                continue_final_message=body.continue_final_message,
                chat_template_kwargs=body.chat_template_kwargs,
            )
            self.check_fits(text)
        # The template already writes any BOS it wants; don't let the tokenizer add another.
        return self.engine.encode(text, add_special_tokens=False)

    def tokenize(self, body: TokenizeRequest) -> list[int]:
        if body.messages is not None:
            return self.chat(body)
        text = body.prompt or ""
        self.check_fits(text, generating=False)
        return self.engine.encode(text, add_special_tokens=body.add_special_tokens)

    def completion(self, body: CompletionRequest) -> list[list[int]]:
        """The prompt field's four shapes (text, texts, token ids, lists of ids) as token lists."""
        p, special = body.prompt, body.add_special_tokens
        if isinstance(p, str):
            prompts = [self._encode(p, special)]
        elif all(isinstance(x, str) for x in p):
            for x in p:  # every text checked before any is tokenized
                self.check_fits(x)  # type: ignore[arg-type]
            prompts = [self.engine.encode(x, add_special_tokens=special) for x in p]  # type: ignore[arg-type]
        elif all(isinstance(x, int) for x in p):
            prompts = [list(p)]  # type: ignore[arg-type]
        else:
            prompts = [list(x) for x in p]  # type: ignore[union-attr]
        for ids in prompts:
            self.check_ids(ids)
        return prompts

    def check_ids(self, ids: list[int]) -> None:
        vocab = len(self.engine.tokenizer)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"token ids out of range [0, {vocab}): {bad[:5]}")
