"""A hand-written Llama forward pass for CPU decoding, with per-sequence KV caches.

Why not `model.generate()` or the HF forward: at 135M parameters a decode step is bound by
streaming the weights from memory (~540 MB in fp32) plus per-op dispatch overhead. HF's forward
spends ~40 small ops per layer on masks, cache objects, rotate-half RoPE and unfused norms; this
loop spends ~15:

- q/k/v and gate/up are fused into one matmul each (fewer, larger weight reads);
- q/k weight rows are permuted at load so RoPE is one complex multiply (interleaved pairs), and
  the 1/sqrt(head_dim) scale is folded into the q weights (attention scores are unchanged: q and
  k get the same permutation);
- RMSNorm is one fused op; K and V land in the cache with one copy;
- all running sequences decode in one batched matmul per weight (the weights are read once per
  step, whatever the batch size), so concurrent streams cost little extra.

Numerics follow `transformers`' LlamaForCausalLM; the unit tests compare logits and greedy tokens.

Longer contexts than the model was trained on: RoPE scaling without fine-tuning (NTK-aware by
default, see `rope_frequencies`). The KV cache may be bfloat16 (half the memory of float32; prefill
attention then runs SDPA's bf16 kernel, ~3x faster on long prompts with AMX).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ROPE_SCALINGS = ("yarn", "ntk", "linear", "none")


@dataclass(frozen=True)
class LlamaShape:
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    rope_theta: float
    max_len: int  # the context served: native_len, or more with RoPE scaling
    native_len: int = 0  # max_position_embeddings, what the model was trained on


def supports(config: object) -> bool:
    """Whether `config` (a transformers PretrainedConfig) is a plain Llama this module can run."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if rope else "default"
    return (
        getattr(config, "model_type", None) == "llama"
        and not getattr(config, "attention_bias", False)
        and not getattr(config, "mlp_bias", False)
        and getattr(config, "hidden_act", "silu") == "silu"
        and rope_type == "default"
        and getattr(config, "pretraining_tp", 1) == 1
    )


def _rope_theta(config: object) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def rope_frequencies(
    head_dim: int, theta: float, native: int, context: int, method: str = "ntk"
) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [D/2], attention factor) for running `context` positions on a model
    trained on `native`: RoPE scaling without fine-tuning.

    - "yarn" (YaRN, arXiv 2309.00071; transformers' `_compute_yarn_parameters` with its defaults,
      beta_fast 32, beta_slow 1): dimensions that turn many times within `native` keep their
      frequency (extrapolate), slow ones are divided by the factor (interpolate), a linear ramp
      in between; q and k are scaled by 0.1 ln(factor) + 1 (a softmax temperature).
    - "ntk": NTK-aware, theta * factor^(D / (D - 2)) for every dimension (static: the same
      at every length, as a KV cache that outlives one request needs).

    Measured on SmolLM2-135M at 32K (4x): ntk beat yarn on perplexity at 2K, 4-8K and 8-12K
    and on needle retrieval at 11.5K; linear wrecks short contexts (see the bench's notes).
    - "linear": position interpolation, every frequency divided by the factor.
    - "none": positions past `native` are extrapolated as is (what the model never saw).
    """
    dims = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
    base = 1.0 / theta**dims
    factor = context / native
    if factor <= 1 or method == "none":
        return base, 1.0
    if method == "linear":
        return base / factor, 1.0
    if method == "ntk":
        return 1.0 / (theta * factor ** (head_dim / (head_dim - 2))) ** dims, 1.0
    if method != "yarn":
        raise ValueError(f"unknown RoPE scaling {method!r}: one of {', '.join(ROPE_SCALINGS)}")

    def dim_for(rotations: float) -> float:  # the dimension that turns `rotations` times
        return head_dim * math.log(native / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(dim_for(32)), 0)
    high = min(math.ceil(dim_for(1)), head_dim - 1)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(
        0, 1
    )
    inv_freq = base / factor * ramp + base * (1 - ramp)
    return inv_freq, 0.1 * math.log(factor) + 1.0


class KVCache:
    """One sequence's keys and values, all layers: [layers, capacity, 2 (k|v), kv_heads, dim].

    Position-major so one decode step writes k and v of a layer with a single copy. Grows by
    doubling, so a short request does not reserve the whole context.
    """

    def __init__(self, shape: LlamaShape, capacity: int, dtype: torch.dtype) -> None:
        self.length = 0
        self.limit = shape.max_len
        cap = max(16, min(capacity, shape.max_len))
        self.kv = torch.empty(
            (shape.n_layers, cap, 2, shape.n_kv_heads, shape.head_dim), dtype=dtype
        )

    @property
    def capacity(self) -> int:
        return self.kv.shape[1]

    def copy_prefix(self, other: KVCache, n: int) -> None:
        """Start this (empty) cache with the first `n` positions of `other` (a prefix-cache hit).

        K/V at position i depend only on tokens 0..i, so a shared token prefix means shared K/V.
        """
        assert self.length == 0 and n <= other.length
        self.reserve(n)
        self.kv[:, :n] = other.kv[:, :n]
        self.length = n

    def trim(self) -> None:
        """Drop unused capacity (a copy), so an idle cache holds only what it uses."""
        if self.capacity > self.length:
            self.kv = self.kv[:, : max(self.length, 1)].clone()

    def reserve(self, n: int) -> None:
        """Make room for `n` more positions."""
        need = self.length + n
        if need > self.limit:
            raise ValueError(f"sequence of {need} tokens exceeds the context of {self.limit}")
        if need <= self.capacity:
            return
        cap = min(self.limit, max(need, 2 * self.capacity))
        new = torch.empty((self.kv.shape[0], cap, *self.kv.shape[2:]), dtype=self.kv.dtype)
        new[:, : self.length] = self.kv[:, : self.length]
        self.kv = new

    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


class DenseLinear:
    """y = x @ W.T in the weight's dtype (float32 by default)."""

    kind = "dense"

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight.contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


GROUP = 32  # GGUF's Q4_0/Q4_1 block size


def int4_groups(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(q, scale, min) if every 32-wide row block of `w` is exactly min + scale * q, q in 0..15.

    True for weights dequantised from GGUF Q4_1/Q4_0 (llama.cpp sets min and scale from the
    block's extremes), so re-packing them as int4 loses nothing; None for anything else.
    """
    n, k = w.shape
    if k % GROUP:
        return None
    g = w.float().view(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = (hi - lo) / 15
    q = ((g - lo[..., None]) / scale.clamp(min=1e-30)[..., None]).round().clamp(0, 15)
    err = (q * scale[..., None] + lo[..., None] - g).abs().max()
    if err > 1e-6 * max(float(g.abs().max()), 1e-30):
        return None
    return q.to(torch.int32).view(n, k), scale, lo


class Int4Linear:
    """Weight-only int4 (the GGUF's own 4-bit blocks) for decode; bf16 dense for prefill.

    Decode reads ~1/7 of the float32 bytes, and decode is bound by reading weights, so it runs
    ~2x faster. torch's CPU int4 kernel takes bf16 activations (llama.cpp itself rounds them to
    8 bits for Q4_1). For many rows (prefill) the int4 kernel is slow and a bf16 matmul (AMX
    where present) is fastest, so a dense bf16 copy of the dequantised weight is kept for that.
    """

    kind = "int4"
    max_rows = 16  # above this, the dense bf16 path wins

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> None:
        n, k = q.shape
        self.packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
        # the kernel computes (q - 8) * scale + zero, so zero = min + 8 * scale
        zero = lo + 8 * scale
        self.scale_zero = torch.stack([scale.t(), zero.t()], dim=-1).contiguous().bfloat16()
        groups = q.view(n, k // GROUP, GROUP).float() * scale[..., None] + lo[..., None]
        self.dense = groups.view(n, k).bfloat16()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.bfloat16()
        if x.shape[0] <= self.max_rows:
            y = torch._weight_int4pack_mm_for_cpu(xb, self.packed, GROUP, self.scale_zero)
        else:
            y = F.linear(xb, self.dense)
        return y.float()


def make_linear(w: torch.Tensor, quant: str) -> DenseLinear | Int4Linear:
    """quant "int4": int4 when lossless (else dense float32); "none": always dense float32."""
    if quant == "int4" and hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        groups = int4_groups(w)
        if groups is not None:
            return Int4Linear(*groups)
    return DenseLinear(w.float())


class FastLlama:
    """Weights pulled out of a HF LlamaForCausalLM, re-laid for few, large matmuls."""

    prefix_caching = True  # its KVCache can start from another's prefix (copy_prefix)

    def __init__(
        self,
        hf_model: torch.nn.Module,
        quant: str = "int4",
        *,
        context: int | None = None,
        rope_scaling: str = "ntk",
        kv_dtype: torch.dtype = torch.float32,
    ) -> None:
        """`context`: positions to serve (default: the model's own); beyond the native length,
        RoPE is scaled by `rope_scaling` (see `rope_frequencies`). `kv_dtype`: the KV cache's
        and attention's dtype (bfloat16: half the memory, ~3x faster long-prompt attention)."""
        cfg = hf_model.config
        n_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        s = self.shape = LlamaShape(
            n_layers=cfg.num_hidden_layers,
            hidden=cfg.hidden_size,
            n_heads=n_heads,
            n_kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim,
            vocab=cfg.vocab_size,
            eps=float(cfg.rms_norm_eps),
            rope_theta=_rope_theta(cfg),
            max_len=int(context or cfg.max_position_embeddings),
            native_len=int(cfg.max_position_embeddings),
        )
        self.rope_scaling = rope_scaling if s.max_len > s.native_len else "none"
        self.dtype = dtype = torch.float32  # activations, norms
        self.kv_dtype = kv_dtype
        sd = {k: v.detach() for k, v in hf_model.state_dict().items()}
        # rotate-half pairs (i, i + D/2) -> adjacent pairs (2i, 2i + 1), per head.
        half = s.head_dim // 2
        perm = torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).flatten()

        def rows(w: torch.Tensor, heads: int) -> torch.Tensor:
            return w.view(heads, s.head_dim, -1)[:, perm].reshape(heads * s.head_dim, -1)

        def lin(w: torch.Tensor) -> DenseLinear | Int4Linear:
            return make_linear(w, quant)

        self.embed = sd["model.embed_tokens.weight"].to(dtype).contiguous()
        # the head stays float32: it is Q8_0 in the GGUF, not 4-bit
        self.lm_head = DenseLinear(
            sd.get("lm_head.weight", sd["model.embed_tokens.weight"]).to(dtype)
        )
        self.final_norm = sd["model.norm.weight"].to(dtype)
        self.layers: list[dict] = []
        for i in range(s.n_layers):
            p = f"model.layers.{i}."
            q = rows(sd[p + "self_attn.q_proj.weight"].float(), s.n_heads) * s.head_dim**-0.5
            k = rows(sd[p + "self_attn.k_proj.weight"].float(), s.n_kv_heads)
            v = sd[p + "self_attn.v_proj.weight"].float()
            gate, up = sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]
            self.layers.append(
                {
                    "ln1": sd[p + "input_layernorm.weight"].to(dtype),
                    "ln2": sd[p + "post_attention_layernorm.weight"].to(dtype),
                    "qkv": lin(torch.cat([q, k, v])),
                    "o": lin(sd[p + "self_attn.o_proj.weight"]),
                    "gate_up": lin(torch.cat([gate, up])),
                    "down": lin(sd[p + "mlp.down_proj.weight"]),
                }
            )
        kinds = [
            lin.kind for layer in self.layers for lin in layer.values() if hasattr(lin, "kind")
        ]
        self.weights_kind = (
            "int4"
            if kinds and all(k == "int4" for k in kinds)
            else ("float32" if not any(k == "int4" for k in kinds) else "mixed int4/float32")
        )
        inv_freq, attn_factor = rope_frequencies(
            s.head_dim, s.rope_theta, s.native_len, s.max_len, self.rope_scaling
        )
        angles = torch.outer(torch.arange(s.max_len, dtype=torch.float32), inv_freq)
        # YaRN's attention factor scales q and k alike: it rides on the rotation's magnitude.
        self.freqs = torch.polar(torch.full_like(angles, attn_factor), angles)  # [max_len, D/2]
        self.q_dim = s.n_heads * s.head_dim
        self.kv_dim = s.n_kv_heads * s.head_dim

    @property
    def max_len(self) -> int:
        return self.shape.max_len

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(self.shape, capacity, self.kv_dtype)

    # -- building blocks -------------------------------------------------------------------
    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.shape.hidden,), weight, self.shape.eps)

    def _rope_qk(self, qkv: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        """RoPE on the q and k parts of `qkv` [n, q+k+v]; returns [n, heads + kv_heads, D]."""
        s = self.shape
        n = qkv.shape[0]
        qk = qkv[:, : self.q_dim + self.kv_dim].float().reshape(n, -1, s.head_dim // 2, 2)
        out = torch.view_as_real(torch.view_as_complex(qk) * freqs)  # freqs [n, 1, D/2]
        return out.view(n, -1, s.head_dim).to(self.kv_dtype)

    def _mlp(self, x: torch.Tensor, layer: dict) -> torch.Tensor:
        gate, up = layer["gate_up"](self._norm(x, layer["ln2"])).chunk(2, dim=-1)
        return x + layer["down"](F.silu(gate) * up)

    # -- prefill: one sequence, a chunk of tokens -------------------------------------------
    @torch.inference_mode()
    def prefill(self, cache: KVCache, tokens: list[int], all_logits: bool = False) -> torch.Tensor:
        """Run `tokens` (the next chunk of one sequence) through the model; logits of the last
        (of every token with `all_logits`: for perplexity measurements)."""
        s = self.shape
        n = len(tokens)
        start = cache.length
        cache.reserve(n)
        end = start + n
        x = self.embed[torch.tensor(tokens, dtype=torch.long)]  # [n, hidden]
        freqs = self.freqs[start:end].unsqueeze(1)
        # Chunks after the first attend to the cached prefix: an explicit causal mask with the
        # diagonal shifted by `start` (SDPA's is_causal aligns top-left, which is wrong here).
        mask = torch.ones(n, end, dtype=torch.bool).tril(diagonal=start) if start else None
        for li, layer in enumerate(self.layers):
            qkv = layer["qkv"](self._norm(x, layer["ln1"]))
            qk = self._rope_qk(qkv, freqs)
            kv = cache.kv[li]
            kv[start:end, 0] = qk[:, s.n_heads :]
            kv[start:end, 1] = qkv[:, self.q_dim + self.kv_dim :].view(n, s.n_kv_heads, -1)
            attn = F.scaled_dot_product_attention(
                qk[:, : s.n_heads].transpose(0, 1).unsqueeze(0),
                kv[:end, 0].transpose(0, 1).unsqueeze(0),
                kv[:end, 1].transpose(0, 1).unsqueeze(0),
                attn_mask=mask,
                is_causal=mask is None,
                scale=1.0,  # folded into the q weights
                enable_gqa=True,
            )  # [1, H, n, D]
            x = x + layer["o"](attn[0].transpose(0, 1).reshape(n, self.q_dim).to(self.dtype))
            x = self._mlp(x, layer)
        cache.length = end
        if all_logits:
            return self.lm_head(self._norm(x, self.final_norm)).float()
        return self.lm_head(self._norm(x[-1:], self.final_norm))[0].float()

    # -- decode: one new token for each of several sequences ---------------------------------
    @torch.inference_mode()
    def decode(self, caches: list[KVCache], tokens: list[int]) -> torch.Tensor:
        """One step for a batch of sequences (each its own cache and position); logits [B, V]."""
        s = self.shape
        b = len(caches)
        for c in caches:
            c.reserve(1)
        lengths = [c.length for c in caches]
        x = self.embed[torch.tensor(tokens, dtype=torch.long)]  # [B, hidden]
        freqs = self.freqs[torch.tensor(lengths, dtype=torch.long)].unsqueeze(1)
        group = s.n_heads // s.n_kv_heads
        for li, layer in enumerate(self.layers):
            qkv = layer["qkv"](self._norm(x, layer["ln1"]))
            qk = self._rope_qk(qkv, freqs)
            v = qkv[:, self.q_dim + self.kv_dim :].view(b, s.n_kv_heads, s.head_dim)
            # Attention differs per sequence (own cache, own length): a short loop of a few
            # small ops each. GQA by grouping query heads per kv head, no repeat of K/V.
            outs = []
            for i, c in enumerate(caches):
                n = lengths[i] + 1
                kv = c.kv[li]
                kv[n - 1, 0] = qk[i, s.n_heads :]
                kv[n - 1, 1] = v[i]
                if self.kv_dtype == torch.float32:
                    qi = qk[i, : s.n_heads].view(s.n_kv_heads, group, s.head_dim)
                    scores = torch.matmul(qi, kv[:n, 0].permute(1, 2, 0))  # [kvH, G, n]
                    outs.append(torch.matmul(scores.softmax(-1), kv[:n, 1].transpose(0, 1)))
                else:  # SDPA's CPU kernel accumulates low-precision inputs in float32
                    outs.append(
                        F.scaled_dot_product_attention(
                            qk[i, : s.n_heads].unsqueeze(1).unsqueeze(0),
                            kv[:n, 0].transpose(0, 1).unsqueeze(0),
                            kv[:n, 1].transpose(0, 1).unsqueeze(0),
                            scale=1.0,
                            enable_gqa=True,
                        )
                    )
            attn = (torch.stack(outs) if b > 1 else outs[0]).reshape(b, self.q_dim).to(self.dtype)
            x = x + layer["o"](attn)
            x = self._mlp(x, layer)
        for c in caches:
            c.length += 1
        return self.lm_head(self._norm(x, self.final_norm)).float()
