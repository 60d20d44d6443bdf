"""Llama 3 / Llama 4 tiktoken tokenizers against llama-models' reference Tokenizer classes."""

from __future__ import annotations

import random
import re
import shutil
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama_models.llama3.tokenizer import Tokenizer as Meta3
from llama_models.llama4.tokenizer import Tokenizer as Meta4
from llamaherd.errors import TokenizerError
from llamaherd.tokenizer import StreamDecoder, Tokenizer
from llamaherd.tokenizer.tiktoken_bpe import meta_pieces

from .tokenizer_fixtures import CORPUS, LONE_SURROGATES, LONG_RUNS


@pytest.fixture(scope="module", params=["llama3", "llama4"])
def pair(request):
    """(ours, Meta's reference) for one family."""
    if request.param == "llama3":
        return Tokenizer.llama3(), Meta3.get_instance()
    return Tokenizer.llama4(), Meta4.get_instance()


def test_special_tables_and_ids_match_reference(pair):
    ours, ref = pair
    assert ours.kind == "tiktoken"
    assert ours.special_tokens == ref.special_tokens
    assert ours.vocab_size == ref.n_words
    assert ours.bos_id == ref.bos_id and ours.eos_id == ref.eos_id
    assert ours.stop_ids == frozenset(ref.stop_tokens)
    assert ours.special_id("<|end_of_text|>") == ref.eos_id == ours.special_id("end_of_text")
    with pytest.raises(TokenizerError, match="no special token"):
        ours.special_id("<|no_such_token|>")


def test_known_ids():
    # Golden ids from the official files: <|begin_of_text|>=128000, <|eot_id|>=128009 (Llama 3);
    # <|begin_of_text|>=200000, <|eot|>=200008, <|header_start|>=200005 (Llama 4).
    l3, l4 = Tokenizer.llama3(), Tokenizer.llama4()
    assert (l3.bos_id, l3.special_id("eot_id"), l3.special_id("eom_id"), l3.special_id("python_tag")) == (
        128000, 128009, 128008, 128010,
    )
    assert l3.stop_ids == {128001, 128008, 128009}
    assert (l4.bos_id, l4.special_id("eot"), l4.special_id("header_start"), l4.special_id("python_start")) == (
        200000, 200008, 200005, 200016,
    )
    assert l4.stop_ids == {200001, 200007, 200008}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_ids_match_reference_on_corpus(pair, name):
    ours, ref = pair
    text = CORPUS[name]
    assert ours.encode(text) == ref.encode(text, bos=False, eos=False)
    assert ours.encode(text, bos=True, eos=True) == ref.encode(text, bos=True, eos=True)
    assert ours.decode(ours.encode(text)) == text


@pytest.mark.parametrize("name", sorted(LONG_RUNS))
def test_ids_match_reference_on_long_runs(pair, name):
    ours, ref = pair
    text = LONG_RUNS[name]
    ids = ours.encode(text)
    assert ids == ref.encode(text, bos=False, eos=False)
    assert ours.decode(ids) == text


def test_long_run_ids_differ_from_one_plain_tiktoken_call():
    # The trap the reference avoids: the cuts change the ids, so matching the reference is not vacuous.
    ours, ref = Tokenizer.llama3(), Meta3.get_instance()
    for text in ("abc" * 10_000, "7" * 30_000, " " * 30_000 + "a"):
        assert ours.encode(text) != ref.model.encode_ordinary(text)
        assert ours.encode(text) == ref.encode(text, bos=False, eos=False)


@pytest.mark.parametrize("name", sorted(LONE_SURROGATES))
def test_lone_surrogates_never_raise_and_match_reference(pair, name):
    ours, ref = pair
    text = LONE_SURROGATES[name]
    assert ours.encode(text) == ref.encode(text, bos=False, eos=False)
    assert "\ufffd" in ours.decode(ours.encode(text))


def test_special_literals_are_plain_text(pair):
    ours, _ = pair
    for literal, id in ours.special_tokens.items():
        if "reserved" in literal:
            continue
        ids = ours.encode(literal)
        assert id not in ids and len(ids) > 1, literal
        assert ours.decode(ids) == literal


def _meta_split(text: str) -> list[str]:
    # The reference's own splitting, composed exactly as its encode() composes it.
    return [
        sub
        for i in range(0, len(text), 400_000)
        for sub in Meta3._split_whitespaces_or_nonwhitespaces(text[i : i + 400_000], 25_000)
    ]


@pytest.mark.parametrize(
    "lengths",
    [
        [1, 24_999, 25_000, 25_001, 3, 50_000, 50_001, 75_002],
        [25_001] * 6,
        [399_999, 2, 60_000],
        [100_000, 100_000, 100_000, 99_990, 20, 30_000],
    ],
)
def test_meta_pieces_equal_reference_split(lengths):
    # Alternate non-whitespace / whitespace runs of the given lengths (unicode whitespace included).
    parts = [("ab字" * l)[:l] if k % 2 == 0 else (" \t\n\u3000" * l)[:l] for k, l in enumerate(lengths)]
    text = "".join(parts)
    assert list(meta_pieces(text)) == _meta_split(text)


def test_meta_pieces_equal_reference_split_random_layouts():
    # Runs of lengths near the 12,500-block pre-check and the 25,000 cut, at random offsets.
    rng = random.Random(0)
    for _ in range(12):
        parts, size = [], 0
        space = rng.random() < 0.5
        while size < 120_000:
            n = rng.choice([1, 2, 7, 12_499, 12_500, 12_501, 24_999, 25_000, 25_001, 25_002, 37_500, 50_001])
            n = max(1, n + rng.randint(-2, 2))
            parts.append(("\u3000 \t\n" if space else "x字.9")[rng.randint(0, 3)] * n)
            size += n
            space = not space
        text = "".join(parts)
        assert list(meta_pieces(text)) == _meta_split(text)


def test_regex_whitespace_is_str_isspace():
    # meta_pieces relies on Python's `\s` agreeing with str.isspace(), which the reference uses.
    space = re.compile(r"\s")
    mismatched = [c for c in map(chr, range(sys.maxunicode + 1)) if bool(space.match(c)) != c.isspace()]
    assert mismatched == []


def test_token_bytes_match_reference(pair):
    ours, ref = pair
    ids = list(range(0, ours.vocab_size, 997)) + sorted(ours.special_tokens.values())[:40]
    for i in ids:
        assert ours.token_bytes(i) == ref.model.decode_single_token_bytes(i)
    text = CORPUS["all"]
    assert b"".join(ours.token_bytes(i) for i in ours.encode(text)) == text.encode("utf-8")
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        ours.token_bytes(ours.vocab_size)
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        ours.decode([1, -1])


def test_decode_invalid_utf8_never_raises(pair):
    ours, ref = pair
    # Byte-level tokens for lone continuation bytes / truncated sequences exist in both vocabularies.
    byte_ids = [ours.encode(bytes([b]).decode("latin-1"))[0] for b in range(3)]  # sanity: encode works
    assert byte_ids
    bad = [i for i in range(ours.n_base) if len(ours.token_bytes(i)) == 1 and ours.token_bytes(i)[0] >= 0x80][:40]
    assert bad
    out = ours.decode(bad)
    assert out == ref.decode(bad) and "\ufffd" in out


def test_decode_skip_special(pair):
    ours, _ = pair
    ids = ours.encode("hi there", bos=True, eos=True)
    assert ours.decode(ids, skip_special=True) == "hi there"
    assert ours.decode(ids).startswith("<|begin_of_text|>")


def test_detection_by_content_not_name(tmp_path):
    import llama_models

    from pathlib import Path

    root = Path(llama_models.__file__).parent
    # Swap the names on purpose: the content decides.
    shutil.copy(root / "llama4" / "tokenizer.model", tmp_path / "llama3.model")
    shutil.copy(root / "llama3" / "tokenizer.model", tmp_path / "vocab.bin")
    assert Tokenizer.from_file(tmp_path / "llama3.model").vocab_size == 202048
    assert Tokenizer.from_file(tmp_path / "vocab.bin").vocab_size == 128256
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shutil.copy(root / "llama3" / "tokenizer.model", folder / "tokenizer.model")
    assert Tokenizer.from_file(folder).special_tokens == Meta3.get_instance().special_tokens


def test_malformed_files_raise_typed_errors(tmp_path):
    import llama_models

    from pathlib import Path

    src = (Path(llama_models.__file__).parent / "llama3" / "tokenizer.model").read_text()
    lines = src.splitlines()
    cases = {
        "missing": None,
        "empty": "",
        "garbage": "\x00\x01not a tokenizer\xff",
        "truncated": "\n".join(lines[:5000]) + "\n",
        "bad_base64": "\n".join(lines[:60] + ["!!!notbase64 60"] + lines[61:120]) + "\n",
        "bad_rank": "\n".join(lines[:60] + [lines[60].split()[0] + " sixty"]) + "\n",
        "gap_in_ranks": "\n".join(lines[:60] + lines[61:128_001]) + "\n",
    }
    for name, content in cases.items():
        p = tmp_path / name
        if content is not None:
            p.write_text(content, encoding="utf-8", errors="surrogateescape")
        with pytest.raises(TokenizerError) as info:
            Tokenizer.from_file(p)
        assert name in str(info.value)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(TokenizerError, match="neither tokenizer.json nor tokenizer.model"):
        Tokenizer.from_file(tmp_path / "emptydir")


# Text from every Unicode category that matters to the pre-tokenizer regexes (letters of each case, marks,
# numbers, punctuation, symbols, separators, controls), surrogates excluded.
_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), max_codepoint=0x1FAFF)
    | st.sampled_from(list(" \t\n\r'sStTlLdD0123456789<|>_\u200d\u0301")),
    max_size=80,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_TEXT)
def test_property_ids_match_reference(pair, text):
    ours, ref = pair
    ids = ours.encode(text)
    assert ids == ref.encode(text, bos=False, eos=False)
    assert ours.decode(ids) == text
    stream = StreamDecoder(ours)
    assert "".join(stream.push(i) for i in ids) + stream.flush() == text
