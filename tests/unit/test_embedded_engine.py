"""The engine and the hand-written Llama path, on a tiny random Llama and a byte-level tokenizer.

Tiny and seeded, so these run in seconds without the real weights; the real model is exercised
in tests/integration/test_embedded_backend.py.
"""

from __future__ import annotations

import threading
import time

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from inference.embedded.engine import Engine  # noqa: E402
from inference.embedded.errors import EngineOverloaded, InvalidRequest  # noqa: E402
from inference.embedded.hf_runner import HFRunner  # noqa: E402
from inference.embedded.llama import GROUP, FastLlama, int4_groups, supports  # noqa: E402
from inference.embedded.runtime import configure_torch  # noqa: E402
from inference.embedded.sampling import SamplingParams  # noqa: E402

MAX_LEN = 256


def byte_tokenizer() -> object:
    """A real byte-level BPE tokenizer with no merges: one token per UTF-8 byte (+ 2 specials).

    Multi-byte characters span several tokens, which is what incremental detokenising must cope
    with.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    vocab["<bos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>")
    fast.chat_template = (
        "{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<bos>assistant: {% endif %}"
    )
    return fast


def tiny_llama(q4: bool = False, seed: int = 0) -> object:
    """A 2-layer Llama with SmolLM2's shape ratios (GQA 2:1); `q4`: weights on Q4_1's grid."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=258,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_LEN,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        eos_token_id=256,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.3 if "embed" in name else 0.08)
            if q4 and p.dim() == 2 and "embed" not in name:
                n, k = p.shape
                g = p.view(n, k // GROUP, GROUP)
                lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
                scale = (hi - lo) / 15
                p.copy_((((g - lo) / scale).round() * scale + lo).view(n, k))
    return model


@pytest.fixture(scope="module", autouse=True)
def _torch_settings() -> None:
    configure_torch()


@pytest.fixture(scope="module")
def tok() -> object:
    return byte_tokenizer()


def hf_logits(model: object, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


def test_supports_plain_llama_only() -> None:
    assert supports(tiny_llama().config)
    qwen_like = tiny_llama().config
    qwen_like.attention_bias = True
    assert not supports(qwen_like)


def test_fast_float32_matches_transformers_in_chunks_and_decode() -> None:
    model = tiny_llama()
    fast = FastLlama(model, quant="none")
    assert fast.weights_kind == "float32"
    ids = list(range(3, 40))
    ref = hf_logits(model, ids)
    cache = fast.new_cache(8)  # small: forces the cache to grow
    fast.prefill(cache, ids[:10])
    last = fast.prefill(cache, ids[10:30])  # second chunk attends to the cached first one
    assert torch.allclose(last, ref[29], atol=1e-4)
    for i in range(30, len(ids)):
        step = fast.decode([cache], [ids[i]])[0]
        assert torch.allclose(step, ref[i], atol=1e-4)


def test_batched_decode_equals_one_by_one() -> None:
    fast = FastLlama(tiny_llama(), quant="none")
    prompts = [[5, 6, 7], list(range(10, 30)), [42]]
    solo = []
    for p in prompts:
        c = fast.new_cache(32)
        fast.prefill(c, p)
        solo.append(fast.decode([c], [9])[0])
    caches = [fast.new_cache(32) for _ in prompts]
    for c, p in zip(caches, prompts, strict=True):
        fast.prefill(c, p)
    batch = fast.decode(caches, [9, 9, 9])
    for i in range(3):
        assert torch.allclose(batch[i], solo[i], atol=1e-4)


def test_int4_is_exact_for_q4_grid_weights_and_refused_otherwise() -> None:
    w = tiny_llama(q4=True).model.layers[0].mlp.down_proj.weight.detach()
    q, scale, lo = int4_groups(w)
    rebuilt = (q.view(w.shape[0], -1, GROUP).float() * scale[..., None] + lo[..., None]).view(
        w.shape
    )
    assert torch.allclose(rebuilt, w, atol=1e-6)
    assert int4_groups(tiny_llama().model.layers[0].mlp.down_proj.weight.detach()) is None


def test_int4_decode_tracks_float32() -> None:
    model = tiny_llama(q4=True)
    fast = FastLlama(model, quant="int4")
    assert fast.weights_kind == "int4"
    ids = list(range(3, 30))
    ref = hf_logits(model, ids)
    cache = fast.new_cache(64)
    fast.prefill(cache, ids[:-1])
    step = fast.decode([cache], [ids[-1]])[0]
    # bf16 activations: close, not bit-equal; the argmax agrees
    assert torch.nn.functional.cosine_similarity(step, ref[-1], dim=0) > 0.999
    assert int(step.argmax()) == int(ref[-1].argmax())


def test_hf_runner_agrees_with_fast_path(tok: object) -> None:
    model = tiny_llama()
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompt = [1, 2, 3, 4]
    texts = []
    for runner in (FastLlama(model, quant="none"), HFRunner(model, MAX_LEN)):
        engine = Engine(runner, tok).start()
        try:
            texts.append(engine.generate(prompt, params).token_ids)
        finally:
            engine.shutdown()
    assert texts[0] == texts[1]


@pytest.fixture
def engine(tok: object) -> Engine:
    eng = Engine(FastLlama(tiny_llama(), quant="none"), tok, max_num_seqs=4, max_waiting=8)
    eng.start()
    yield eng
    eng.shutdown()


def test_streamed_pieces_are_valid_utf8_and_add_up(engine: Engine, tok: object) -> None:
    # High temperature on a random model: plenty of stray bytes, i.e. broken characters.
    params = SamplingParams(max_tokens=60, temperature=1.5, seed=3, ignore_eos=True)
    pieces, ids = [], []
    for out in engine.submit(tok.encode("héllo 世界"), params):
        pieces.append(out.text)
        ids += out.token_ids
    assert len(ids) == 60
    assert "".join(pieces) == tok.decode(ids)
    # Random bytes include invalid UTF-8 that decodes to U+FFFD whatever we do; but no piece
    # ends in one (a character cut in half), and nothing is lost or doubled.
    assert not any(p.endswith("\ufffd") for p in pieces[:-1])


def test_multibyte_characters_stream_whole(engine: Engine, tok: object) -> None:
    from inference.embedded.detok import IncrementalDetokenizer

    text = "añ 世界 🙂 ok"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, tok.encode("prompt "), skip_special_tokens=True)
    pieces = [detok.add(t) for t in ids]
    assert "".join(pieces) == text
    assert "🙂" in pieces and "世" in pieces  # released whole, once complete


def test_seed_max_tokens_and_usage(engine: Engine) -> None:
    p = SamplingParams(max_tokens=7, temperature=1.0, seed=11, ignore_eos=True)
    a = engine.generate([1, 2, 3], p)
    b = engine.generate(
        [1, 2, 3], SamplingParams(max_tokens=7, temperature=1.0, seed=11, ignore_eos=True)
    )
    assert a.token_ids == b.token_ids and len(a.token_ids) == 7
    assert a.finish_reason == "length" and a.prompt_tokens == 3


def test_stop_string_ends_generation(engine: Engine) -> None:
    greedy = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    full = engine.generate([7, 8, 9], greedy).text
    word = full[10:13]
    cut = engine.generate(
        [7, 8, 9], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[word])
    )
    assert cut.finish_reason == "stop" and cut.stop_reason == word
    assert cut.text == full[: full.index(word)]


def test_context_limit_and_empty_prompt(engine: Engine) -> None:
    with pytest.raises(InvalidRequest, match="maximum context length is 256 tokens"):
        engine.submit([1] * 200, SamplingParams(max_tokens=100))
    with pytest.raises(InvalidRequest):
        engine.submit([], SamplingParams(max_tokens=1))
    out = engine.generate(
        [1] * 250, SamplingParams(max_tokens=None, temperature=0, ignore_eos=True)
    )
    assert len(out.token_ids) == 6  # max_tokens defaults to what the context has left


def test_queue_bound_cancel_and_many_concurrent(engine: Engine) -> None:
    long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    with engine._cv:  # hold the worker off so the queue fills deterministically
        handles = [engine.submit([1, 2], long) for _ in range(engine.max_waiting)]
        with pytest.raises(EngineOverloaded):
            engine.submit([1, 2], long)
    for h in handles:
        h.cancel()
    reasons = [list(h)[-1].finish_reason for h in handles]
    assert set(reasons) <= {"abort", "length"} and "abort" in reasons
    deadline = time.time() + 10
    while (engine.num_running() or engine.num_waiting()) and time.time() < deadline:
        time.sleep(0.01)
    assert engine.num_running() == engine.num_waiting() == 0

    # More requests than max_num_seqs (but no more than may wait), from threads: all complete.
    results: list[int] = []

    def worker() -> None:
        p = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
        results.append(len(engine.generate([3, 4, 5], p).token_ids))

    threads = [threading.Thread(target=worker) for _ in range(engine.max_waiting)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [5] * engine.max_waiting
    assert engine.alive


def test_a_failing_request_does_not_kill_the_worker(engine: Engine) -> None:
    bad = SamplingParams(max_tokens=3, temperature=0, logit_bias={10**6: 1.0})  # index error
    out = list(engine.submit([1, 2], bad))[-1]
    assert out.finish_reason == "error"
    assert engine.alive
    assert engine.generate([1, 2], SamplingParams(max_tokens=2, temperature=0)).token_ids
