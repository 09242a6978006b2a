"""Incremental detokenisation and stop strings, for streaming one token at a time.

A token may end in the middle of a UTF-8 character (byte-level BPE), and decoding a token alone
may drop the space it carries, so each step decodes a small window that includes a few earlier
tokens, emits only the new suffix, and holds text back while it ends in U+FFFD (an incomplete
character). This is vLLM's and TGI's scheme.
"""

from __future__ import annotations

from typing import Any

_CONTEXT = 5  # prompt tokens seeded into the window, so the first output token decodes in context


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], skip_special_tokens: bool) -> None:
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-_CONTEXT:])
        self.prefix = 0  # window start
        self.read = len(self.ids)  # tokens before this were already turned into text

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def add(self, token_id: int) -> str:
        """Feed one token; return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix : self.read])
        full = self._decode(self.ids[self.prefix :])
        if len(full) > len(prefix_text) and not full.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return full[len(prefix_text) :]
        return ""


class StopChecker:
    """Finds stop strings in the generated text and holds back what may be the start of one."""

    def __init__(self, stops: list[str], include_stop: bool) -> None:
        self.stops = [s for s in stops if s]
        self.include = include_stop
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""  # all text so far (up to a stop)
        self.sent = 0  # chars already released

    def feed(self, new: str) -> tuple[str, str | None]:
        """Add `new`; return (text safe to release now, the stop string hit or None)."""
        start = max(0, len(self.text) - self.holdback)
        self.text += new
        if self.stops:
            hits = [(i, s) for s in self.stops if (i := self.text.find(s, start)) >= 0]
            if hits:
                i, s = min(hits)
                self.text = self.text[: i + len(s)] if self.include else self.text[:i]
                return self.flush(), s
        end = max(self.sent, len(self.text) - self.holdback)
        out, self.sent = self.text[self.sent : end], end
        return out, None

    def flush(self) -> str:
        """Release everything held back (the sequence ended)."""
        out, self.sent = self.text[self.sent :], len(self.text)
        return out
