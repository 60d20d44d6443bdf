"""GGUF vocabularies: our tokenizer gives llama.cpp's token ids (llama-cpp-python, vocab_only) on varied text."""

from __future__ import annotations

import random

import pytest
from gguf import GGMLQuantizationType as QT

from llamaherd.config import ModelConfig
from llamaherd.tokenizer import Tokenizer
from llamaherd.tokenizer.gguf_vocab import from_gguf
from tests.conftest import random_model
from tests.gguf_read_fixtures import bpe_vocab_metadata, gemma_gguf, write_llama_gguf

llama_cpp = pytest.importorskip("llama_cpp")

CORPUS = [
    "Hello world", " leading space", "  two spaces", "trailing  ", "\n\nnewlines\n\n\n", "tabs\tand\ttabs",
    "日本語のテキストと中文", "emoji 👩‍👩‍👧‍👦 and 🤖🀄️", "مرحبا بالعالم", "नमस्ते दुनिया", "café naïve e\u0301",
    "I'LL We'Re don't it's", "12345678901234567890 3.14159", "def f(x):\n    return x**2  # comment",
    '{"a": [1, 2, {"b": null}], "c": "d"}', "<start_of_turn>user\nhi<end_of_turn>", "<bos>literal <eos>",
    "<|begin_of_text|><|eot_id|>", "<unused0>", "[multimodal]", "<h1>html</h1>", "a" * 300, " " * 40,
    "\u00a0nbsp\u2003em", "\x00\x01ctrl", "ÿþ", "The quick brown fox jumps over the lazy dog. " * 5, "",
]


def random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = list("abcXYZ 019.,'!?\n\t-_") + ["é", "ß", "中", "語", "🙂", "👍🏽", "\u200d", "ع", "क", "\u0301", "  ", "'s", "<", ">"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    path = gemma_gguf(tmp_path_factory.mktemp("gemma-tok"))
    return from_gguf(path), llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


def test_gemma_spm_vocab_matches_llama_cpp(gemma):
    ours, ref = gemma
    for text in CORPUS + random_texts(300, 0):
        assert ours.encode(text) == ref.tokenize(text.encode(), add_bos=False, special=False), repr(text)


def test_gemma_round_trip_and_specials(gemma):
    ours, ref = gemma
    for text in CORPUS:
        assert ours.decode(ours.encode(text)) == text
    # <bos> 2 and <eos> 1 from tokenizer.ggml.*_token_id; <end_of_turn> found by text as llama.cpp does.
    assert ours.bos_id == ref.token_bos() == 2 and ours.eos_id == ref.token_eos() == 1
    assert ours.special_id("end_of_turn") in ours.stop_ids and ours.eos_id in ours.stop_ids
    assert ours.encode("hi", bos=True)[0] == 2
    assert ours.vocab_size == ref.n_vocab() == 262144
    assert Tokenizer.from_file(ref.model_path).encode("Hello world") == ours.encode("Hello world")


def test_gguf_bpe_vocab_matches_llama_cpp(tmp_path):
    """A byte-level BPE ("gpt2", pre "llama-bpe") trained here with the tokenizers library, stored in a tiny
    Llama GGUF; llama.cpp tokenizes it from the file."""
    meta, tokens = bpe_vocab_metadata(CORPUS * 3 + random_texts(400, 1))
    c = ModelConfig(dim=64, n_layers=1, n_heads=4, vocab_size=len(tokens), hidden_dim=128, rope_theta=500000.0, max_seq_len=256)
    path = tmp_path / "bpe.gguf"
    write_llama_gguf(path, c, random_model(c).state_dict(), QT.F32, vocab=meta)
    ours = from_gguf(path)
    ref = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    for text in CORPUS + random_texts(200, 2):
        ids = ours.encode(text)
        assert ids == ref.tokenize(text.encode(), add_bos=False, special=False), repr(text)
        assert ours.decode(ids) == text
    assert ours.stop_ids == {1, 1} | {tokens.index("<|eot_id|>")}


def test_llama2_style_spm_vocab_matches_llama_cpp_and_sentencepiece(tmp_path):
    """A SentencePiece BPE model trained here (byte fallback, as Llama 2's), its pieces/scores/types stored as
    llama.cpp's converter stores them, with add_space_prefix on (Llama 1/2)."""
    import sentencepiece

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(1, 7))) for _ in range(200)]
    lines = [" ".join(rng.choice(words) for _ in range(10)) for _ in range(1500)] + CORPUS * 3
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(tmp_path / "sp"), model_type="bpe", vocab_size=500,
        byte_fallback=True, character_coverage=0.995, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True, minloglevel=2)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    n = sp.get_piece_size()
    # token kinds as convert_hf_to_gguf.py `_create_vocab_sentencepiece` assigns them (gguf TokenType values)
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    import gguf

    V = gguf.GGUFValueType
    meta = {"tokenizer.ggml.model": ("llama", V.STRING),
            "tokenizer.ggml.tokens": ([sp.id_to_piece(i) for i in range(n)], V.ARRAY),
            "tokenizer.ggml.scores": ([sp.get_score(i) for i in range(n)], V.ARRAY),
            "tokenizer.ggml.token_type": (types, V.ARRAY, V.INT32),
            "tokenizer.ggml.bos_token_id": (sp.bos_id(), V.UINT32), "tokenizer.ggml.eos_token_id": (sp.eos_id(), V.UINT32),
            "tokenizer.ggml.unknown_token_id": (sp.unk_id(), V.UINT32),
            "tokenizer.ggml.add_space_prefix": (True, V.BOOL)}
    c = ModelConfig(dim=64, n_layers=1, n_heads=4, vocab_size=n, hidden_dim=128, max_seq_len=256)
    path = tmp_path / "spm.gguf"
    write_llama_gguf(path, c, random_model(c).state_dict(), QT.F32, vocab=meta)
    ours = from_gguf(path)
    ref = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    texts = [t for t in CORPUS + random_texts(200, 3) if t]
    for text in texts:
        ids = ours.encode(text)
        assert ids == ref.tokenize(text.encode(), add_bos=False, special=False), repr(text)
        assert ours.decode(ids) == text, repr(text)
    plain = [t for t in texts if t.isascii() and t.isprintable() and "  " not in t and not t.startswith(" ")]
    assert len(plain) > 10
    for text in plain:
        assert ours.encode(text) == sp.encode(text), repr(text)
