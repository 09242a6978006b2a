"""Sampling parameters and the per-token sampler: greedy, temperature, top-k/p, min-p, penalties."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    skip_special_tokens: bool = True

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1


def make_generator(seed: int | None) -> torch.Generator:
    """A private RNG per request: the same seed gives the same tokens, whatever else is running."""
    gen = torch.Generator()
    gen.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return gen


def _apply_penalties(
    logits: torch.Tensor, p: SamplingParams, prompt_ids: list[int], output_ids: list[int]
) -> torch.Tensor:
    if p.repetition_penalty != 1.0:  # CTRL-style, over prompt and output (as vLLM)
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long)
        vals = logits[seen]
        logits[seen] = torch.where(
            vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
        )
    if output_ids and (p.presence_penalty or p.frequency_penalty):  # OpenAI's, over output only
        counts = torch.bincount(torch.tensor(output_ids), minlength=logits.shape[0]).float()
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return logits


def sample(
    logits: torch.Tensor,
    p: SamplingParams,
    gen: torch.Generator,
    prompt_ids: list[int],
    output_ids: list[int],
    banned: list[int] | None = None,
) -> int:
    """Pick the next token from `logits` [vocab] (float32, may be modified in place)."""
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), dtype=torch.long)
        logits[ids] += torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype)
    if banned:  # EOS / stop tokens before min_tokens
        logits[torch.tensor(banned, dtype=torch.long)] = float("-inf")
    logits = _apply_penalties(logits, p, prompt_ids, output_ids)
    if p.greedy:
        return int(logits.argmax())
    logits = logits / p.temperature
    if 0 < p.top_k < logits.shape[0]:
        vals, ids = torch.topk(logits, p.top_k)  # sorted, most likely first
        probs = torch.softmax(vals, dim=-1)
    else:
        probs, ids = torch.softmax(logits, dim=-1), None
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    if p.top_p < 1.0:
        probs, ids = _top_p(probs, ids, p.top_p)
    # Inverse-CDF draw: one random number (torch.multinomial draws one per vocabulary entry,
    # ~1.5 ms per token here).
    cdf = torch.cumsum(probs, dim=-1)
    u = torch.rand(1, generator=gen, dtype=cdf.dtype) * cdf[-1]
    j = min(int(torch.searchsorted(cdf, u, right=True)), cdf.shape[0] - 1)
    while float(probs[j]) == 0.0 and j > 0:  # never a masked-out token (u at a CDF plateau)
        j -= 1
    return int(ids[j]) if ids is not None else j


def _top_p(
    probs: torch.Tensor, ids: torch.Tensor | None, top_p: float, head: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest set of most likely tokens whose mass reaches `top_p`: (probs, token ids).

    Sorting the whole vocabulary costs milliseconds per token; the nucleus almost always lies
    within the few hundred most likely tokens, so look there first (exact whenever it does) and
    sort everything only when it does not. `ids`: token ids of `probs` (None: the identity).
    """
    total = float(probs.sum())
    k = min(head, probs.shape[0])
    top, order = torch.topk(probs, k)
    if float(top.sum()) < top_p * total and k < probs.shape[0]:
        top, order = torch.sort(probs, descending=True)
    cum = torch.cumsum(top, dim=-1)
    keep = (cum - top) < top_p * total  # preceding mass below top_p: at least the first token
    order = order[keep]
    return top[keep], (ids[order] if ids is not None else order)
