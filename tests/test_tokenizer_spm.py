"""SentencePiece tokenizers (Llama 1/2 style) against the sentencepiece library, on a model trained here."""

from __future__ import annotations

import random
import shutil

import pytest
import sentencepiece

from llamaherd.errors import TokenizerError
from llamaherd.tokenizer import StreamDecoder, Tokenizer

from .tokenizer_fixtures import CORPUS, LONE_SURROGATES, LONG_RUNS


def train_spm(folder, vocab_size: int = 600, **options) -> "Path":  # noqa: F821
    """A small BPE SentencePiece model with byte fallback, trained like Llama 2's (identity normalization,
    split digits, whitespace-only pieces allowed). Returns the path of the .model file."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 8))) for _ in range(300)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000)]
    lines += [v for k, v in sorted(CORPUS.items()) if k not in ("empty", "space", "all")] * 5
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(folder / "sp"),
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=0.995,  # rare characters (emoji, some CJK) fall back to <0xXX> byte pieces
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        minloglevel=2,
        **options,
    )
    return folder / "sp.model"


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    return train_spm(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def pair(sp_path):
    return Tokenizer.from_file(sp_path), sentencepiece.SentencePieceProcessor(model_file=str(sp_path))


def test_ids_and_tables(pair):
    ours, ref = pair
    assert ours.kind == "sentencepiece"
    assert (ours.bos_id, ours.eos_id) == (1, 2) == (ref.bos_id(), ref.eos_id())
    assert ours.stop_ids == frozenset({2})
    assert ours.vocab_size == ref.vocab_size()
    assert ours.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}
    assert ours.special_id("<s>") == 1 and ours.special_id("s") == 1


@pytest.mark.parametrize("name", sorted(CORPUS) + ["letters_60k", "spaces_50k", "emoji_26k"])
def test_ids_match_library(pair, name):
    ours, ref = pair
    text = {**CORPUS, **LONG_RUNS}[name]
    assert ours.encode(text) == ref.encode(text)
    assert ours.encode(text, bos=True, eos=True) == [1] + ref.encode(text) + [2]
    assert ours.decode(ours.encode(text)) == text == ref.decode(ref.encode(text))


def test_byte_fallback_is_used(pair):
    ours, ref = pair
    ids = ours.encode("🦙")
    assert [ref.id_to_piece(i) for i in ids][-4:] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]


def test_special_literals_are_plain_text(pair):
    ours, _ = pair
    for text in ("<s>", "</s>", "<unk>", "[INST] <s>hi</s>"):
        ids = ours.encode(text)
        assert not set(ids) & {0, 1, 2}
        assert ours.decode(ids) == text


@pytest.mark.parametrize("name", sorted(LONE_SURROGATES))
def test_lone_surrogates_never_raise(pair, name):
    ours, ref = pair
    text = LONE_SURROGATES[name]
    with pytest.raises((UnicodeEncodeError, RuntimeError)):
        ref.encode(text)  # the library itself refuses these; we repair them to U+FFFD first
    ids = ours.encode(text)
    assert ids == ref.encode(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"))
    assert "\ufffd" in ours.decode(ids)


def test_token_bytes_and_stream_match_library_decode(pair):
    ours, ref = pair
    for name, text in sorted(CORPUS.items()):
        ids = ours.encode(text, bos=True, eos=True)
        stream = StreamDecoder(ours)
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == ref.decode(ids), name


def test_invalid_bytes_decode_and_stream_like_library(pair):
    ours, ref = pair
    byte_id = {b: ref.piece_to_id(f"<0x{b:02X}>") for b in range(256)}
    rng = random.Random(1)
    for _ in range(200):
        seq = [byte_id[rng.choice([0x41, 0x80, 0x9F, 0xBF, 0xC3, 0xE2, 0xF0, 0xFF, 0xA9])] for _ in range(rng.randint(1, 8))]
        want = ref.decode(seq)
        assert ours.decode(seq) == want
        stream = StreamDecoder(ours)
        assert "".join(stream.push(i) for i in seq) + stream.flush() == want, [ref.id_to_piece(i) for i in seq]


def test_detection_by_content_and_folder(sp_path, tmp_path):
    shutil.copy(sp_path, tmp_path / "vocab.bin")
    assert Tokenizer.from_file(tmp_path / "vocab.bin").kind == "sentencepiece"
    (tmp_path / "ckpt").mkdir()
    shutil.copy(sp_path, tmp_path / "ckpt" / "tokenizer.model")
    assert Tokenizer.from_file(tmp_path / "ckpt").vocab_size == 600


def test_malformed_model_raises(sp_path, tmp_path):
    data = sp_path.read_bytes()
    (tmp_path / "truncated.model").write_bytes(data[: len(data) // 3])
    with pytest.raises(TokenizerError, match="truncated.model"):
        Tokenizer.from_file(tmp_path / "truncated.model")
    (tmp_path / "junk.model").write_bytes(b"\x0a\xff\xff\xff\xff\x0fjunk")
    with pytest.raises(TokenizerError, match="junk.model"):
        Tokenizer.from_file(tmp_path / "junk.model")


def test_code_llama_infill_pieces(tmp_path):
    # Code Llama ships ▁<PRE> ▁<MID> ▁<SUF> ▁<EOT> as control pieces 32007..32010; infilling stops at ▁<EOT>.
    pieces = ["\u2581<PRE>", "\u2581<SUF>", "\u2581<MID>", "\u2581<EOT>"]
    path = train_spm(tmp_path, control_symbols=pieces)
    ref = sentencepiece.SentencePieceProcessor(model_file=str(path))
    tok = Tokenizer.from_file(path)
    for piece in pieces:
        assert tok.special_id(piece) == ref.piece_to_id(piece) > 2
    assert tok.stop_ids == {2, ref.piece_to_id("\u2581<EOT>")}
    assert tok.encode(" <PRE> x <EOT>") == ref.encode(" <PRE> x <EOT>")  # literals in text stay text
    assert not set(tok.encode(" <PRE> x <EOT>")) & set(tok.special_ids)
