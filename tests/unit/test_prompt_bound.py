"""The prompt bounds the gateway reserves and refuses by (inference/gateway/prompt_bound.py),
checked against the embedded model's real tokenizer (SmolLM2: byte-level BPE, no normaliser)
and chat template, on inputs chosen to be cheap in bytes and dear in tokens."""

from __future__ import annotations

import contextlib
import io
import json
import random
from typing import Any

import pytest

from inference.gateway import prompt_bound as pb

OVERHEAD = 256  # GatewaySettings.prompt_overhead_tokens' default

HOSTILE = [
    "",
    "a",
    " ",
    "\n" * 50,
    "x" * 1000,
    "é" * 300,  # 2 bytes a character
    "€" * 300,  # 3
    "😀" * 300,  # 4, a surrogate pair in JSON
    "\u0000\u0001\u001f" * 100,  # control characters: escaped in JSON
    '"\\' * 200,
    "<|im_start|><|im_end|>" * 50,  # special tokens' text in user content
    "".join(chr(c) for c in range(0x20, 0x2FF)),
    "tok " * 400,
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from inference.embedded import weights

    source = weights.resolve(None)
    with contextlib.redirect_stderr(io.StringIO()):  # the GGUF reader's progress bar
        return AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)


def chat_tokens(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> int:
    """As the embedded engine counts a chat prompt (Engine.chat_prompt)."""
    text = tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, tokenize=False
    )
    return len(tokenizer.encode(text, add_special_tokens=False))


def test_the_tokenizer_is_byte_level_without_normaliser(tokenizer: Any) -> None:
    """What the upper bound's argument rests on."""
    backend = tokenizer.backend_tokenizer
    assert backend.normalizer is None
    assert "ByteLevel" in type(backend.pre_tokenizer).__name__ or "ByteLevel" in str(
        backend.pre_tokenizer
    )
    longest = max(len(tokenizer.convert_tokens_to_string([t]).encode()) for t in tokenizer.vocab)
    assert longest <= pb.MAX_TOKEN_BYTES


@pytest.mark.parametrize("text", HOSTILE, ids=range(len(HOSTILE)))
def test_upper_bound_holds_for_chat(tokenizer: Any, text: str) -> None:
    for messages in (
        [{"role": "user", "content": text}],
        [{"role": "system", "content": text}, {"role": "user", "content": text}],
        [{"role": "user", "content": ""} for _ in range(30)] + [{"role": "user", "content": text}],
    ):
        body = {"model": "m", "messages": messages}
        tokens = chat_tokens(tokenizer, messages)
        assert tokens <= pb.upper_bound(body, OVERHEAD), (tokens, text[:20])
        assert pb.lower_bound(body) <= tokens


@pytest.mark.parametrize("text", HOSTILE, ids=range(len(HOSTILE)))
def test_upper_bound_holds_for_completions(tokenizer: Any, text: str) -> None:
    body = {"model": "m", "prompt": text}
    tokens = len(tokenizer.encode(text, add_special_tokens=True))
    assert tokens <= pb.upper_bound(body, 0)  # no template at all: the body alone bounds it
    assert pb.lower_bound(body) <= tokens


def test_upper_bound_holds_with_tools(tokenizer: Any) -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "f",
            "description": "d",
            "parameters": {"type": "object", "properties": {"x": {"type": "string"}}},
        },
    }
    messages = [{"role": "user", "content": "hi"}]
    for tools in ([tool], [tool] * 20):
        body = {"model": "m", "messages": messages, "tools": tools}
        assert chat_tokens(tokenizer, messages, tools) <= pb.upper_bound(body, OVERHEAD)


def test_upper_bound_holds_for_random_text(tokenizer: Any) -> None:
    rng = random.Random(11)
    alphabet = [chr(c) for c in (*range(0x20, 0x7F), *range(0xA0, 0x800), 0x4E2D, 0x1F600)]
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 400)))
        messages = [{"role": "user", "content": text}]
        body = {"model": "m", "messages": messages}
        assert chat_tokens(tokenizer, messages) <= pb.upper_bound(body, OVERHEAD)


def test_token_id_prompts_count_exactly() -> None:
    body = {"model": "m", "prompt": [1, 22, 333]}
    assert pb.lower_bound(body) == 3 <= pb.upper_bound(body, 0)
    batch = {"model": "m", "prompt": [[1, 2], [3, 4, 5]], "n": 2}
    assert pb.lower_bound(batch) == 3 and pb.choices(batch) == 4


def test_choices_and_max_tokens() -> None:
    assert pb.choices({"prompt": ["a", "b", "c"]}) == 3
    assert pb.choices({"messages": [], "n": 4}) == 4
    assert pb.choices({"prompt": "a", "n": 2, "best_of": 5}) == 5
    assert pb.completion_bound({"max_tokens": 7}) == 7
    # Backends read one or the other (vLLM's completions: max_tokens only): the larger bounds both.
    assert pb.completion_bound({"max_tokens": 7, "max_completion_tokens": 3}) == 7
    assert pb.completion_bound({"max_tokens": 4000, "max_completion_tokens": 1}) == 4000
    assert pb.completion_bound({"max_tokens": 2, "max_completion_tokens": 9}) == 9
    assert pb.completion_bound({}) is None


def test_lower_bound_of_a_24_mb_prompt_passes_any_small_context() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 24_000_000}]}
    assert pb.lower_bound(body) == 24_000_000 // pb.MAX_TOKEN_BYTES  # 93,750 > 8,192
    assert json.dumps(body)  # the bound needs no tokenizer
