"""TextStream properties over random token sequences: pieces concatenate to the tokenizer's own decode,
and a stop string cuts exactly where it first appears in that decode, wherever token boundaries fall."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamaherd.engine.text import TextStream


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
