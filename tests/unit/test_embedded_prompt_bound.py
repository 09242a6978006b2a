"""The lower bound on a prompt's token count that lets the embedded server refuse a 24 MB prompt
without tokenizing it (issue 11, item 3): it must never exceed the real count, whatever the text.

Real byte-level BPE tokenizers (HF `tokenizers`), trained here in milliseconds on a small corpus.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers  # noqa: E402

from inference.embedded.prompts import _byte_chars, token_bound  # noqa: E402

CORPUS = ["a" * 64, " " * 40, "\n" + " " * 30, "hello world " * 20, "héllo wörld 😀 " * 10] * 50
PIECES = ["a", "a" * 17, " ", " " * 41, "\n", "hello", " world", "é", "😀", "\x04", "\x1d",
          chr(0x40000), "<|special|>", "zq", "\t\t"]  # fmt: skip


def train(drop: str = "", unk: str | None = None, normalizer=None) -> SimpleNamespace:
    byte_chars = {b: c for c, b in _byte_chars().items()}
    alphabet = [c for b, c in byte_chars.items() if chr(b) not in drop]
    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if normalizer is not None:
        tok.normalizer = normalizer
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        initial_alphabet=alphabet,
        special_tokens=["<|special|>"] + ([unk] if unk else []),
        show_progress=False,
    )
    tok.train_from_iterator([t for t in CORPUS if not set(t) & set(drop)], trainer)
    return SimpleNamespace(backend_tokenizer=tok)


def random_texts(n: int) -> list[str]:
    rng = random.Random(7)
    return ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 300))) for _ in range(n)]


@pytest.mark.parametrize("drop", ["", "\x04\x1d"])
def test_the_bound_never_exceeds_the_real_token_count(drop: str) -> None:
    tok = train(drop)
    bound = token_bound(tok)
    assert bound is not None and bound.dropped == drop
    for text in random_texts(1500):
        real = len(tok.backend_tokenizer.encode(text, add_special_tokens=False).ids)
        assert bound.least_tokens(text) <= real, (text, bound.least_tokens(text), real)


def test_the_bound_grows_with_the_text() -> None:
    bound = token_bound(train())
    assert bound is not None and 1 < bound.longest <= 64
    assert bound.least_tokens("a" * 24_000_000) >= 24_000_000 // bound.longest


def test_dropped_characters_are_not_counted() -> None:
    """A byte without a token vanishes: a text of only those must not be claimed long."""
    tok = train("\x04")
    bound = token_bound(tok)
    assert bound is not None
    text = "\x04" * 10_000
    assert tok.backend_tokenizer.encode(text).ids == []
    assert bound.least_tokens(text) == 0


@pytest.mark.parametrize(
    "variant",
    [
        {"normalizer": normalizers.NFKC()},  # may shrink the text: no bound claimed
        {"drop": "\x04", "unk": "<unk>"},  # an unknown token may stand for any run
    ],
)
def test_no_bound_where_it_is_not_provable(variant: dict) -> None:
    assert token_bound(train(**variant)) is None


def test_no_bound_for_other_tokenizers() -> None:
    assert token_bound(object()) is None
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    assert token_bound(SimpleNamespace(backend_tokenizer=wordpiece)) is None
