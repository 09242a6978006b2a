"""Prefix KV-cache reuse across requests: an LRU of finished sequences' KV caches.

An agent resends the same 8-13K-token system prompt and tool schemas every turn; prefilling
that on two CPU cores takes tens of seconds. K/V at position i depend only on tokens 0..i, so a
new prompt that shares its first m tokens with a cached sequence can start from a copy of those
m positions and prefill only the rest.

- Entries are whole sequences (prompt + generated tokens, as far as the KV cache holds them),
  handed over by the engine when a request ends; an entry is never written again, and a hit
  copies its first m positions into the new request's own cache, so nothing of one request
  reaches another beyond the shared tokens themselves.
- Matching is the longest common token prefix over all entries (a few; a vectorised compare).
  At least the prompt's last token is always recomputed: its logits pick the first token.
- Bounded by bytes and entries; least recently used goes first. A new entry that extends an
  old one replaces it (the old is a prefix of the new: nothing is lost).

Not a radix tree with shared blocks (vLLM, SGLang): two entries with a common prefix each hold
their own copy of it. With a handful of entries (one agent's turns) that costs memory, not time.
Used only from the engine's worker thread, so it takes no lock; counters are read elsewhere.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Entry:
    tokens: torch.Tensor  # int64 [n]: the tokens whose K/V the cache holds
    cache: Any  # the runner's cache object (llama.KVCache), exactly len(tokens) positions
    nbytes: int


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the longest common prefix of two 1-D token tensors."""
    n = min(len(a), len(b))
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0, 0]) if len(diff) else n


class PrefixCache:
    def __init__(self, max_bytes: int, max_entries: int = 8, min_tokens: int = 16) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.min_tokens = min_tokens  # shorter sequences are not worth an entry
        self._entries: OrderedDict[int, Entry] = OrderedDict()  # oldest first
        self._next_key = 0
        self.bytes = 0
        # vLLM's counters, in tokens: queried (prompt tokens looked up) and hit (reused).
        self.queries = 0
        self.hits = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt: list[int]) -> tuple[Any, int]:
        """(cache to copy from, tokens reusable) for `prompt`, or (None, 0); counts the query.

        The reusable count is at most len(prompt) - 1, so the caller still computes the last
        prompt token (whose logits the first sampled token comes from).
        """
        self.queries += len(prompt)
        if not self._entries or len(prompt) < 2:
            return None, 0
        ids = torch.tensor(prompt, dtype=torch.long)
        best_key, best = -1, 0
        for key, entry in self._entries.items():
            n = common_prefix(ids, entry.tokens)
            if n > best:
                best_key, best = key, n
        best = min(best, len(prompt) - 1)
        if best < self.min_tokens:
            return None, 0
        self._entries.move_to_end(best_key)  # most recently used
        self.hits += best
        return self._entries[best_key].cache, best

    def insert(self, tokens: list[int], cache: Any) -> bool:
        """Keep `cache` (holding K/V for `tokens`; the caller no longer writes it). False when
        it is not kept (too short, too big, or already covered by an entry)."""
        if len(tokens) < self.min_tokens or cache.length != len(tokens):
            return False
        ids = torch.tensor(tokens, dtype=torch.long)
        for key, entry in list(self._entries.items()):
            n = common_prefix(ids, entry.tokens)
            if n == len(ids):  # already covered: refresh that entry instead
                self._entries.move_to_end(key)
                return False
            if n == len(entry.tokens):  # the new one extends it: the old one is redundant
                self._drop(key)
        cache.trim()  # drop unused capacity before accounting for it
        nbytes = int(cache.nbytes())
        if nbytes > self.max_bytes:
            return False
        while self._entries and (
            self.bytes + nbytes > self.max_bytes or len(self._entries) >= self.max_entries
        ):
            self._drop(next(iter(self._entries)))
            self.evictions += 1
        self._entries[self._next_key] = Entry(ids, cache, nbytes)
        self._next_key += 1
        self.bytes += nbytes
        return True

    def clear(self) -> None:
        for key in list(self._entries):
            self._drop(key)

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key)
        self.bytes -= entry.nbytes
