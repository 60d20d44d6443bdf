"""Hostile input: huge unbroken strings encode in linear time and memory; broken text never raises."""

from __future__ import annotations

import random
import time
import tracemalloc

import pytest

from llama_models.llama3.tokenizer import Tokenizer as Meta3
from llamaherd.tokenizer import Tokenizer


def no_whitespace(n_chars: int) -> str:
    """n_chars of varied text without a single whitespace character (letters, digits, punctuation, CJK)."""
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789.,;:!?-_/\\()[]{}<>|'\"字語é😀"
    block = "".join(rng.choice(alphabet) for _ in range(1 << 16))
    return (block * (n_chars // len(block) + 1))[:n_chars]


def _seconds(tok: Tokenizer, text: str) -> float:
    start = time.process_time()
    tok.encode(text)
    return time.process_time() - start


def _peak_bytes(tok: Tokenizer, text: str) -> tuple[int, int]:
    tracemalloc.start()
    n = len(tok.encode(text))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, n


@pytest.mark.parametrize(
    "small,large",
    [(500_000, 2_000_000), pytest.param(2_500_000, 10_000_000, marks=pytest.mark.slow)],
)
def test_no_whitespace_input_is_linear_in_time_and_memory(small, large):
    tok = Tokenizer.llama3()
    small, large = no_whitespace(small), no_whitespace(large)
    t_small, t_large = _seconds(tok, small), _seconds(tok, large)
    (m_small, n_small), (m_large, n_large) = _peak_bytes(tok, small), _peak_bytes(tok, large)
    assert 3.5 < n_large / n_small < 4.5
    # 4x the input: linear work is ~4x; quadratic would be ~16x. Wide margins for a shared machine.
    assert t_large / t_small < 8, (t_small, t_large)
    assert m_large / m_small < 8, (m_small, m_large)
    assert m_large < 60 * len(large)  # Python-side peak: the id list plus one 400k-character piece at a time


@pytest.mark.slow
def test_10mb_without_whitespace_ids_match_reference():
    text = no_whitespace(10_000_000)
    assert Tokenizer.llama3().encode(text) == Meta3.get_instance().encode(text, bos=False, eos=False)


@pytest.mark.parametrize("family", ["llama3", "llama4"])
def test_broken_text_never_raises(family):
    tok = getattr(Tokenizer, family)()
    for text in ("\ud800", "\udfff\ud800", "a\ud83d", "\ud83d\ude00", "\x00\x01\x7f", "\ufeff\ufffe\uffff", "\U0010ffff"):
        tok.decode(tok.encode(text))
    assert tok.decode(tok.encode("\ud83d\ude00")) == "😀"  # a valid surrogate pair is joined, as tiktoken does
    rng = random.Random(0)
    byte_tokens = [i for i in range(tok.n_base) if len(tok.token_bytes(i)) == 1]
    for _ in range(100):
        out = tok.decode(rng.choices(byte_tokens, k=rng.randint(1, 30)))
        assert isinstance(out, str)
