"""Context extension (RoPE scaling) and prefix KV-cache reuse, on a tiny random Llama.

The tiny model's native context is 256 (MAX_LEN); "extended" engines serve 4x that.
"""

from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from inference.embedded.engine import Engine  # noqa: E402
from inference.embedded.errors import InvalidRequest  # noqa: E402
from inference.embedded.llama import FastLlama, KVCache, rope_frequencies  # noqa: E402
from inference.embedded.prefix_cache import PrefixCache, common_prefix  # noqa: E402
from inference.embedded.runtime import configure_torch  # noqa: E402
from inference.embedded.sampling import SamplingParams  # noqa: E402
from tests.unit.test_embedded_engine import MAX_LEN, byte_tokenizer, tiny_llama  # noqa: E402

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def _torch_settings() -> None:
    configure_torch()


@pytest.fixture(scope="module")
def tok() -> object:
    return byte_tokenizer()


def greedy(n: int = 12) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def make_engine(tok: object, kv_dtype: torch.dtype = torch.float32, **kw: object) -> Engine:
    fast = FastLlama(tiny_llama(), quant="none", context=4 * MAX_LEN, kv_dtype=kv_dtype)
    return Engine(fast, tok, max_num_seqs=4, max_waiting=16, prefill_chunk=64, **kw).start()


def prompt(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), generator=g).tolist()


# -- RoPE scaling ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["yarn", "linear"])
def test_rope_scaling_matches_transformers(method: str) -> None:
    """Our frequencies equal transformers' own YaRN / linear; the logits of a sequence 3x the
    native length match transformers' model run with that rope config."""
    from transformers import LlamaForCausalLM

    native = tiny_llama()
    params = {"rope_type": method, "factor": 4.0, "rope_theta": 10000.0}
    if method == "yarn":
        params["original_max_position_embeddings"] = MAX_LEN
    cfg = native.config.__class__(
        **{**native.config.to_dict(), "max_position_embeddings": 4 * MAX_LEN},
    )
    cfg.rope_parameters = params
    scaled = LlamaForCausalLM(cfg).eval()
    scaled.load_state_dict(native.state_dict())
    inv, factor = rope_frequencies(16, 10000.0, MAX_LEN, 4 * MAX_LEN, method)
    assert torch.allclose(inv, scaled.model.rotary_emb.inv_freq)
    assert factor == pytest.approx(scaled.model.rotary_emb.attention_scaling)

    fast = FastLlama(native, quant="none", context=4 * MAX_LEN, rope_scaling=method)
    assert fast.max_len == 4 * MAX_LEN and fast.rope_scaling == method
    ids = prompt(1, 3 * MAX_LEN)
    with torch.inference_mode():
        ref = scaled(torch.tensor([ids])).logits[0]
    cache = fast.new_cache(len(ids))
    for s in range(0, len(ids), 200):
        got = fast.prefill(cache, ids[s : s + 200], all_logits=True)
        assert torch.allclose(got, ref[s : s + 200], atol=2e-4)


def test_ntk_raises_theta_for_every_dimension() -> None:
    inv, factor = rope_frequencies(64, 1e5, 8192, 32768, "ntk")
    theta = 1e5 * 4 ** (64 / 62)
    assert factor == 1.0 and torch.allclose(inv, 1.0 / theta ** (torch.arange(0, 64, 2) / 64))
    assert FastLlama(tiny_llama(), quant="none", context=4 * MAX_LEN).rope_scaling == "ntk"


def test_native_context_is_unscaled() -> None:
    inv, factor = rope_frequencies(64, 1e5, 8192, 8192, "yarn")
    assert factor == 1.0 and torch.allclose(inv, 1.0 / 1e5 ** (torch.arange(0, 64, 2) / 64))
    assert FastLlama(tiny_llama(), quant="none").rope_scaling == "none"


def test_extended_context_accepts_long_prompts_and_refuses_longer(tok: object) -> None:
    engine = make_engine(tok)
    try:
        assert engine.max_model_len == 4 * MAX_LEN
        out = engine.generate(prompt(2, 3 * MAX_LEN), greedy(4))  # 3x native: accepted
        assert len(out.token_ids) == 4
        with pytest.raises(InvalidRequest, match=r"maximum context length is 1024 tokens\. "):
            engine.submit(prompt(3, 5 * MAX_LEN), greedy(4))
    finally:
        engine.shutdown()


# -- the prefix cache on its own -----------------------------------------------------------------
def kv(fast: FastLlama, tokens: list[int]) -> KVCache:
    cache = fast.new_cache(len(tokens))
    fast.prefill(cache, tokens)
    return cache


def test_common_prefix() -> None:
    t = torch.tensor
    assert common_prefix(t([1, 2, 3]), t([1, 2, 4])) == 2
    assert common_prefix(t([1, 2]), t([1, 2, 3])) == 2
    assert common_prefix(t([5]), t([1])) == 0


def test_lookup_miss_hit_partial_and_last_token_recomputed() -> None:
    fast = FastLlama(tiny_llama(), quant="none")
    pc = PrefixCache(1 << 30, min_tokens=4)
    a = prompt(1, 40)
    assert pc.lookup(a) == (None, 0)  # empty
    assert pc.insert(a, kv(fast, a))
    assert pc.lookup(prompt(9, 40)) == (None, 0)  # unrelated: miss
    src, n = pc.lookup([*a, 7, 8])  # extends a cached sequence: all of it reused
    assert n == 40 and src.length == 40
    assert pc.lookup(a)[1] == 39  # identical: the last token is recomputed for its logits
    assert pc.lookup([*a[:20], 999])[1] == 20  # partial
    assert pc.lookup([*a[:3], 999])[1] == 0  # shorter than min_tokens: not worth it
    assert pc.queries == 40 + 40 + 42 + 40 + 21 + 4 and pc.hits == 40 + 39 + 20


def test_insert_replaces_extended_entries_and_skips_covered_ones() -> None:
    fast = FastLlama(tiny_llama(), quant="none")
    pc = PrefixCache(1 << 30, min_tokens=4)
    a = prompt(1, 30)
    assert pc.insert(a, kv(fast, a))
    assert not pc.insert(a[:20], kv(fast, a[:20]))  # covered by a: nothing new
    longer = a + prompt(2, 10)
    assert pc.insert(longer, kv(fast, longer))  # a is a prefix of it: a goes
    assert len(pc) == 1 and pc.lookup([*longer, 1])[1] == 40
    other = a[:10] + prompt(3, 20)  # shares 10 tokens: a second entry
    assert pc.insert(other, kv(fast, other)) and len(pc) == 2


def test_eviction_is_lru_under_the_byte_bound() -> None:
    fast = FastLlama(tiny_llama(), quant="none")
    seqs = [prompt(i, 50) for i in range(4)]
    per_entry = kv(fast, seqs[0]).nbytes()
    pc = PrefixCache(3 * per_entry, min_tokens=4)
    for s in seqs[:3]:
        assert pc.insert(s, kv(fast, s))
    assert pc.lookup(seqs[0] + [1])[1] == 50  # touch 0: 1 is now the least recently used
    assert pc.insert(seqs[3], kv(fast, seqs[3]))
    assert len(pc) == 3 and pc.bytes <= 3 * per_entry and pc.evictions == 1
    assert pc.lookup(seqs[1] + [1]) == (None, 0)  # evicted
    for i in (0, 2, 3):
        assert pc.lookup(seqs[i] + [1])[1] == 50
    assert not PrefixCache(per_entry // 2, min_tokens=4).insert(seqs[0], kv(fast, seqs[0]))


def test_entries_are_trimmed_to_what_they_hold() -> None:
    fast = FastLlama(tiny_llama(), quant="none")
    a = prompt(1, 20)
    cache = fast.new_cache(200)  # over-allocated, as a request's cache is
    fast.prefill(cache, a)
    pc = PrefixCache(1 << 30, min_tokens=4)
    assert pc.insert(a, cache)
    assert cache.capacity == 20 and pc.bytes == cache.nbytes()


# -- the engine with the prefix cache ----------------------------------------------------------
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
def test_cache_hit_output_equals_cold_output(tok: object, kv_dtype: torch.dtype) -> None:
    cold_engine = make_engine(tok, kv_dtype, prefix_cache_bytes=0)
    warm_engine = make_engine(tok, kv_dtype)
    try:
        assert cold_engine.prefix_cache is None and warm_engine.prefix_cache is not None
        system = prompt(5, 300)  # > the native 256: the extended context, chunked prefill
        first, second = system + prompt(6, 20), system + prompt(7, 25)
        warm_engine.generate(first, greedy())  # fills the cache
        for ids in (second, first):  # a partial hit, then the same prompt again
            handle = warm_engine.submit(ids, greedy())
            outs = list(handle)
            cold = cold_engine.generate(ids, greedy())
            assert [t for o in outs for t in o.token_ids] == cold.token_ids
            assert outs[-1].cached_tokens >= len(system)
            assert cold_engine.prefix_cache_stats() == (0, 0)
        queries, hits = warm_engine.prefix_cache_stats()
        assert queries == len(first) * 2 + len(second) and hits >= 2 * len(system)
    finally:
        cold_engine.shutdown()
        warm_engine.shutdown()


def test_isolation_nothing_past_the_shared_prefix_is_reused(tok: object) -> None:
    """A cached sequence's generated tokens are part of its entry; a new prompt that diverges
    from it reuses only the tokens it really shares, and its output is what a cold run gives."""
    engine = make_engine(tok)
    cold = make_engine(tok, prefix_cache_bytes=0)
    try:
        base = prompt(11, 100)
        a = engine.generate(base, greedy(30))
        # the entry now holds base + 29 generated tokens; continue it with other tokens
        follow = base + a.token_ids[:10] + prompt(12, 15)
        out = list(engine.submit(follow, greedy()))
        assert outs_ids(out) == cold.generate(follow, greedy()).token_ids
        assert out[-1].cached_tokens == len(base) + 10
        # a prompt sharing nothing gets nothing
        fresh = list(engine.submit(prompt(13, 60), greedy()))
        assert fresh[-1].cached_tokens == 0
    finally:
        engine.shutdown()
        cold.shutdown()


def outs_ids(outs: list) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def test_concurrent_requests_with_cancellation_stay_correct(tok: object) -> None:
    """Many requests sharing a prefix, batched, some cancelled mid-way: each completed output
    equals its cold run, and cancelled requests' partial K/V (now in the cache) harm nothing."""
    engine = make_engine(tok)
    cold = make_engine(tok, prefix_cache_bytes=0)
    try:
        system = prompt(21, 280)
        prompts = [system + prompt(100 + i, 10 + i) for i in range(8)]
        expected = [cold.generate(p, greedy(20)).token_ids for p in prompts]
        results: dict[int, list[int]] = {}

        def run(i: int) -> None:
            handle = engine.submit(prompts[i], greedy(20))
            ids = []
            for out in handle:
                ids += out.token_ids
                if i % 3 == 0 and len(ids) >= 3:
                    handle.cancel()
            results[i] = ids

        for _round in range(2):  # the second round starts from what the first left cached
            threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
            for i in range(8):
                if i % 3:
                    assert results[i] == expected[i], i
                else:
                    assert results[i] == expected[i][: len(results[i])], i
        assert engine.alive and engine.prefix_cache_stats()[1] > 0
    finally:
        engine.shutdown()
        cold.shutdown()


def test_failed_requests_do_not_populate_the_cache(tok: object) -> None:
    engine = make_engine(tok)
    try:
        bad = SamplingParams(max_tokens=3, temperature=0, logit_bias={10**6: 1.0})
        assert list(engine.submit(prompt(31, 50), bad))[-1].finish_reason == "error"
        assert engine.generate(prompt(32, 5), greedy(2))  # a step after: retired ones processed
        assert len(engine.prefix_cache) == 0  # the 5-token one is below min_tokens
    finally:
        engine.shutdown()


def test_a_short_prompt_is_not_held_behind_a_long_prefill(tok: object) -> None:
    engine = make_engine(tok)
    try:
        with engine._cv:  # admit both in the same step
            long = engine.submit(prompt(41, 900), greedy(1))
            short = engine.submit(prompt(42, 20), greedy(1))
        order: list[str] = []
        threads = [
            threading.Thread(target=lambda h=h, n=n: (list(h), order.append(n)))
            for h, n in ((long, "long"), (short, "short"))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert order == ["short", "long"]
    finally:
        engine.shutdown()
