"""StreamDecoder: only complete UTF-8 text comes out, and the pieces add up to decode(ids)."""

from __future__ import annotations

import random

import pytest

from llamaherd.tokenizer import StreamDecoder, Tokenizer

from .tokenizer_fixtures import CORPUS

# Rare characters whose UTF-8 bytes the Llama 3/4 vocabularies split over several byte tokens:
# CJK Extension B ideographs, a Linear B syllable, an Egyptian hieroglyph, the llama emoji in a ZWJ sequence.
SPLIT_TEXT = "𠜎𠜱𠝹 𐀀 𓀀 🦙‍🔥 ⿰丨丶 mixed 字 text"


@pytest.fixture(scope="module", params=["llama3", "llama4"])
def tok(request):
    return getattr(Tokenizer, request.param)()


def _stream(tok, ids, **kw):
    stream = StreamDecoder(tok, **kw)
    return [stream.push(i) for i in ids], stream.flush()


def test_characters_split_across_tokens_come_out_whole(tok):
    ids = tok.encode(SPLIT_TEXT)
    partial = [i for i in ids if _is_partial(tok.token_bytes(i))]
    assert len(partial) >= 4, "the test text must split characters across tokens to mean anything"
    pieces, tail = _stream(tok, ids)
    assert "".join(pieces) + tail == SPLIT_TEXT
    assert tail == ""
    assert "" in pieces  # some tokens completed no character and were held back
    assert all("\ufffd" not in p for p in pieces)
    # Every piece is whole characters: the running text is always a prefix of the full text.
    running = ""
    for p in pieces:
        running += p
        assert SPLIT_TEXT.startswith(running)


def _is_partial(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


@pytest.mark.parametrize("name", ["emoji", "cjk", "hindi", "combining", "all"])
def test_stream_equals_decode_on_corpus(tok, name):
    ids = tok.encode(CORPUS[name], bos=True, eos=True)
    pieces, tail = _stream(tok, ids)
    assert "".join(pieces) + tail == tok.decode(ids)
    pieces, tail = _stream(tok, ids, skip_special=True)
    assert "".join(pieces) + tail == tok.decode(ids, skip_special=True) == CORPUS[name]


def test_random_byte_tokens_stream_like_decode(tok):
    # Arbitrary (often invalid) byte sequences: U+FFFD exactly where tiktoken's decode puts it, never a raise.
    singles = [i for i in range(tok.n_base) if len(tok.token_bytes(i)) == 1]
    multi = [i for i in range(0, tok.n_base, 101)]
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.choice(singles if rng.random() < 0.7 else multi) for _ in range(rng.randint(1, 12))]
        pieces, tail = _stream(tok, ids)
        assert "".join(pieces) + tail == tok.decode(ids)


def test_flush_renders_an_unfinished_character(tok):
    ids = tok.encode("🦙")
    stream = StreamDecoder(tok)
    head = "".join(stream.push(i) for i in ids[:-1])
    assert head == ""
    assert stream.flush() == tok.decode(ids[:-1]) == "\ufffd"
