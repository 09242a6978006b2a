"""Benchmark: the embedded model's load time, prefill and decode rates, against `generate()`.

Everything runs in one process, interleaved round by round (machine noise hits all alike), and
reports medians. Not a test: run it by hand,
`.venv/bin/python tests/bench/bench_embedded.py [ROUNDS]`.

- load: cold (GGUF dequantisation into a fresh cache dir) vs from the cache; plus building the
  decode runner (re-laying weights, int4 packing)
- prefill: ~1K prompt tokens, ours (int4 mode prefills with bf16 weights; float32 mode) vs the
  transformers forward
- decode: one stream, greedy, 128 tokens: ours int4, ours float32, ours through the Engine
  (sampling + detokenising included), transformers `generate()`; and 8 streams batched
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(rounds: int) -> None:
    t0 = time.perf_counter()
    from transformers import AutoModelForCausalLM  # noqa: F401  (import cost, measured apart)

    from inference.embedded import weights
    from inference.embedded.engine import Engine
    from inference.embedded.llama import FastLlama
    from inference.embedded.runtime import configure_torch
    from inference.embedded.sampling import SamplingParams

    configure_torch()
    imports = time.perf_counter() - t0
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as cache:
        cold = weights.load(None, cache)
        cached = [weights.load(None, cache) for _ in range(2)][-1]
        assert not cold.from_cache and cached.from_cache
    model, tok = cached.model, cached.tokenizer
    build = {}
    for quant in ("int4", "none"):
        start = time.perf_counter()
        build[quant] = FastLlama(model, quant=quant)
        build[quant + "_s"] = time.perf_counter() - start  # type: ignore[assignment]
    fast4, fast32 = build["int4"], build["none"]
    rows += [
        ("import torch + transformers", f"{imports:.1f} s", ""),
        ("load cold (GGUF -> cache)", f"{cold.load_s:.1f} s", ""),
        ("load from cache", f"{cached.load_s:.2f} s", f"{cold.load_s / cached.load_s:.0f}x faster"),
        ("build runner, int4", f"{build['int4_s']:.2f} s", "re-lay + pack"),
        ("build runner, float32", f"{build['none_s']:.2f} s", ""),
    ]

    # -- prefill, ~1K tokens --------------------------------------------------------------------
    text = "The quick brown fox jumps over the lazy dog. " * 200
    ids = tok.encode(text)[:1024]
    n = len(ids)

    def ours_prefill(fast: FastLlama) -> None:
        cache = fast.new_cache(n)
        for s in range(0, n, 512):  # the engine's default chunk
            fast.prefill(cache, ids[s : s + 512])

    def hf_prefill() -> None:
        with torch.inference_mode():
            model(torch.tensor([ids]), logits_to_keep=1)

    prefill: dict[str, list[float]] = {"ours int4 (bf16 prefill)": [], "ours float32": [], "HF": []}
    for _ in range(rounds):
        prefill["ours int4 (bf16 prefill)"].append(timed(lambda: ours_prefill(fast4)))
        prefill["ours float32"].append(timed(lambda: ours_prefill(fast32)))
        prefill["HF"].append(timed(hf_prefill))
    hf_rate = n / statistics.median(prefill["HF"])
    for name, ts in prefill.items():
        rate = n / statistics.median(ts)
        rows.append((f"prefill {n} tok, {name}", f"{rate:.0f} tok/s", f"{rate / hf_rate:.2f}x HF"))

    # -- decode, 128 tokens greedy ---------------------------------------------------------------
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Write a long story about a dragon."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    p_ids = tok.encode(prompt, add_special_tokens=False)
    new = 128

    def ours_decode(fast: FastLlama) -> float:
        cache = fast.new_cache(len(p_ids) + new)
        nxt = int(fast.prefill(cache, p_ids).argmax())
        start = time.perf_counter()
        for _ in range(new):
            nxt = int(fast.decode([cache], [nxt])[0].argmax())
        return time.perf_counter() - start

    def generate_decode() -> float:
        x = torch.tensor([p_ids])
        with torch.inference_mode():
            first = timed(lambda: model.generate(x, max_new_tokens=1, do_sample=False))
            total = timed(
                lambda: model.generate(
                    x, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
                )
            )
        return total - first  # subtract prefill + first token: decode only

    engines = {q: Engine(f, tok, model_root="bench").start() for q, f in (("int4", fast4),)}
    greedy = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)

    def engine_decode() -> float:
        eng = engines["int4"]
        first = timed(lambda: eng.generate(p_ids, SamplingParams(max_tokens=1, temperature=0)))
        return timed(lambda: eng.generate(p_ids, greedy)) - first

    def batched(fast: FastLlama, b: int = 8) -> float:
        caches = [fast.new_cache(len(p_ids) + 32) for _ in range(b)]
        toks = [int(fast.prefill(c, p_ids).argmax()) for c in caches]
        start = time.perf_counter()
        for _ in range(32):
            toks = fast.decode(caches, toks).argmax(-1).tolist()
        return (time.perf_counter() - start) / (b * 32 / new)  # per 128 tokens, all streams

    decode: dict[str, list[float]] = {
        "ours int4": [],
        "ours float32": [],
        "ours int4 via Engine": [],
        "HF generate()": [],
        "ours int4, 8 streams (total)": [],
    }
    for _ in range(rounds):
        decode["ours int4"].append(ours_decode(fast4))
        decode["ours float32"].append(ours_decode(fast32))
        decode["ours int4 via Engine"].append(engine_decode())
        decode["HF generate()"].append(generate_decode())
        decode["ours int4, 8 streams (total)"].append(batched(fast4))
    for eng in engines.values():
        eng.shutdown()
    gen_rate = new / statistics.median(decode["HF generate()"])
    for name, ts in decode.items():
        rate = new / statistics.median(ts)
        best = new / min(ts)
        rows.append(
            (
                f"decode {new} tok, {name}",
                f"{rate:.1f} tok/s",
                f"{rate / gen_rate:.2f}x generate() (best round {best:.1f})",
            )
        )

    w = max(len(r[0]) for r in rows)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} rounds (median)")
    print(f"{'measure':{w}}  {'value':>12}  note")
    for name, value, note in rows:
        print(f"{name:{w}}  {value:>12}  {note}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
