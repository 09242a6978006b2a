"""The generic model runner: any transformers causal LM through its own forward and KV cache.

Used for architectures the hand-written Llama path (`llama.py`) does not cover. Sequences decode
one at a time (no batching), which is correct for any model, only slower under concurrency.
"""

from __future__ import annotations

from typing import Any

import torch


class HFCache:
    def __init__(self, limit: int) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache()
        self.length = 0
        self.limit = limit

    def nbytes(self) -> int:
        return 0  # not tracked; DynamicCache allocates as it goes


class HFRunner:
    """Same interface as FastLlama: new_cache, prefill (one sequence), decode (a batch)."""

    def __init__(self, hf_model: Any, max_len: int) -> None:
        self.model = hf_model
        self.max_len = max_len

    def new_cache(self, capacity: int) -> HFCache:
        return HFCache(self.max_len)

    @torch.inference_mode()
    def _forward(self, cache: HFCache, tokens: list[int]) -> torch.Tensor:
        if cache.length + len(tokens) > cache.limit:
            raise ValueError(f"sequence exceeds the context of {cache.limit}")
        ids = torch.tensor([tokens], dtype=torch.long)
        pos = torch.arange(cache.length, cache.length + len(tokens)).unsqueeze(0)
        out = self.model(
            input_ids=ids,
            position_ids=pos,
            past_key_values=cache.cache,
            use_cache=True,
            logits_to_keep=1,  # only the last position's logits: skips a [n, vocab] matmul
        )
        cache.length += len(tokens)
        return out.logits[0, -1].float()

    def prefill(self, cache: HFCache, tokens: list[int]) -> torch.Tensor:
        return self._forward(cache, tokens)

    def decode(self, caches: list[HFCache], tokens: list[int]) -> torch.Tensor:
        return torch.stack([self._forward(c, [t]) for c, t in zip(caches, tokens, strict=True)])
