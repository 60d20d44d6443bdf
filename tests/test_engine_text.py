"""TextStream properties over random token sequences: pieces concatenate to the tokenizer's own decode,
and a stop string cuts exactly where it first appears in that decode, wherever token boundaries fall."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamaherd.engine.text import TextStream, Token


@pytest.fixture(scope="module")
def tok():
    from llamaherd.tokenizer import Tokenizer

    return Tokenizer.llama3()


# Byte-level tokens (ids 0-255 hold single bytes in the Llama 3 vocabulary, so many of them are pieces of
# multi-byte characters) mixed with ordinary ones.
ids_strategy = st.lists(st.one_of(st.integers(0, 255), st.integers(256, 128000)), min_size=1, max_size=40)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(ids=ids_strategy)
def test_pieces_concatenate_to_decode(tok, ids):
    ts = TextStream(tok)
    pieces = [ts.push(i) for i in ids] + [ts.flush()]
    assert "".join(pieces) == tok.decode(ids)
    for p in pieces:
        p.encode("utf-8")


@SETTINGS
@given(ids=ids_strategy, cut=st.tuples(st.integers(0, 200), st.integers(1, 4)), end=st.sampled_from(["eot", "length"]))
def test_feed_ends_at_a_stop_string_or_the_engines_end(tok, ids, cut, end):
    """`feed`, the step every engine's caller runs: pieces up to the first stop string, or all of the text when
    the engine ends first (with its end token, never shown, or at its length limit)."""
    full = tok.decode(ids)
    start, n = cut
    stop = full[start % max(len(full), 1):][:n] if start % 3 else ""  # a third of the cases have no stop string
    eot = tok.special_id("<|eot_id|>")
    tokens = [Token(i) for i in ids] + [Token(eot, "stop", stop_token=True)] if end == "eot" else \
        [Token(i) for i in ids[:-1]] + [Token(ids[-1], "length")]
    ts = TextStream(tok, stop=[stop] if stop else [])
    pieces = []
    for t in tokens:
        pieces.append(ts.feed(t))
        if pieces[-1].finish_reason:
            break
    assert all(p.finish_reason is None for p in pieces[:-1])
    text = "".join(p.text for p in pieces)
    if stop and stop in full:
        assert text == full[: full.index(stop)] and pieces[-1].finish_reason == "stop"
    else:
        assert text == full and pieces[-1].finish_reason == ("stop" if end == "eot" else "length")
        assert pieces[-1].stop_token == (eot if end == "eot" else None)


@SETTINGS
@given(ids=ids_strategy, cut=st.tuples(st.integers(0, 200), st.integers(1, 4)))
def test_stop_string_cuts_at_first_occurrence(tok, ids, cut):
    full = tok.decode(ids)
    start, n = cut
    stop = full[start % max(len(full), 1):][:n]
    if not stop:
        return
    ts = TextStream(tok, stop=[stop])
    out = ""
    for i in ids:
        out += ts.push(i)
        if ts.stopped:
            break
    out += ts.flush()
    # The decode of a prefix of the ids may differ from a prefix of the full decode only where a character
    # is still unfinished; the first occurrence in the full text is what the stream must cut at.
    assert out == full[: full.index(stop)]


def test_sentencepiece_llama2_stream_and_chat(tmp_path):
    """Llama 2 path: a SentencePiece tokenizer with byte fallback (trained here like Llama 2's), a tiny model
    with its vocabulary: streamed pieces equal the sentencepiece library's own decode; chat uses [INST]."""
    sentencepiece = pytest.importorskip("sentencepiece")
    from llamaherd.api import Model
    from llamaherd.checkpoint.base import Checkpoint
    from llamaherd.config import ModelConfig
    from llamaherd.tokenizer import Tokenizer

    from .conftest import random_model
    from .test_tokenizer_spm import train_spm

    path = train_spm(tmp_path)
    tok = Tokenizer.from_file(path)
    lib = sentencepiece.SentencePieceProcessor(model_file=str(path))
    config = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=tok.vocab_size, multiple_of=32, max_seq_len=256)
    net = random_model(config, std=0.5)
    m = Model(net, Checkpoint(config, net.state_dict(), "tiny-llama2", tokenizer=tok))
    assert m.chat_format_name == "llama2"
    done = m.complete("hello world", seed=3, max_tokens=60, ignore_eos=True)
    pieces = list(m.generate("hello world", stream=True, seed=3, max_tokens=60, ignore_eos=True))
    assert "".join(pieces) == done.text == lib.decode(done.token_ids)
    msg = m.chat([{"role": "user", "content": "hi"}], seed=1, max_tokens=8)
    assert msg["role"] == "assistant" and isinstance(msg["content"], (str, type(None)))
