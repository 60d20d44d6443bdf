"""Hugging Face tokenizer.json tokenizers against the `tokenizers` library and, for Llama 3, llama-models."""

from __future__ import annotations

import json
import random

import pytest
import tokenizers
from tokenizers import decoders, models, normalizers, trainers

from llama_models.llama3.tokenizer import Tokenizer as Meta3
from llamaherd.errors import TokenizerError
from llamaherd.tokenizer import StreamDecoder, Tokenizer

from .tokenizer_fixtures import CORPUS, LONE_SURROGATES, LONG_RUNS


@pytest.fixture(scope="module")
def llama3_folder(tmp_path_factory):
    """An HF-style Llama 3 folder: tokenizer.json converted from the official tiktoken file by transformers'
    own converter (with Meta's regex and special tokens), plus the config files an Instruct release ships."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    meta = Meta3.get_instance()
    folder = tmp_path_factory.mktemp("llama3_hf")
    model_file = str(__import__("llama_models").__path__[0]) + "/llama3/tokenizer.model"
    converted = TikTokenConverter(
        vocab_file=model_file, pattern=Meta3.pat_str, extra_special_tokens=list(meta.special_tokens)
    ).converted()
    converted.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>", "special": True}})
    )
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128008, 128009]}))
    return folder


@pytest.fixture(scope="module")
def llama3(llama3_folder):
    return Tokenizer.from_file(llama3_folder), Meta3.get_instance()


def test_llama3_tables(llama3):
    ours, meta = llama3
    assert ours.kind == "hf"
    assert ours.special_tokens == meta.special_tokens
    assert ours.vocab_size == meta.n_words
    assert ours.bos_id == meta.bos_id and ours.eos_id == meta.eot_id
    assert ours.stop_ids == frozenset(meta.stop_tokens)


@pytest.mark.parametrize("name", sorted(CORPUS) + sorted(LONE_SURROGATES))
def test_llama3_ids_match_meta(llama3, name):
    ours, meta = llama3
    text = {**CORPUS, **LONE_SURROGATES}[name]
    assert ours.encode(text, bos=True) == meta.encode(text, bos=True, eos=False)
    if name in CORPUS:
        assert ours.decode(ours.encode(text)) == text


def test_llama3_long_runs_match_tokenizers_library(llama3, llama3_folder):
    # tokenizer.json carries no 25,000-character cuts: the reference here is the tokenizers library itself.
    ours, _ = llama3
    lib = tokenizers.Tokenizer.from_file(str(llama3_folder / "tokenizer.json"))
    for name in ("letters_60k", "digits_30k", "mixed_runs"):
        text = LONG_RUNS[name]
        assert ours.encode(text) == lib.encode(text, add_special_tokens=False).ids, name
        assert ours.decode(ours.encode(text)) == text


def test_llama3_token_bytes_and_stream(llama3):
    ours, meta = llama3
    for i in list(range(0, meta.n_words, 1009)) + [128000, 128009, 128255]:
        assert ours.token_bytes(i) == meta.model.decode_single_token_bytes(i)
    ids = ours.encode(CORPUS["all"], bos=True, eos=True)
    stream = StreamDecoder(ours)
    assert "".join(stream.push(i) for i in ids) + stream.flush() == ours.decode(ids) == meta.decode(ids)


# ---- a Llama 2 style tokenizer.json (Metaspace-like normalizer, byte fallback, strip-first-space decoder) ----


def train_spm_style_json(folder):
    """BPE with byte fallback laid out like Llama 2's tokenizer.json (transformers' LlamaConverter, legacy)."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 8))) for _ in range(300)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(1000)]
    lines += [v for k, v in sorted(CORPUS.items()) if k not in ("empty", "space", "all")] * 3
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tk = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tk.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=900, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens], limit_alphabet=120, show_progress=False
    )
    tk.train_from_iterator(lines, trainer)
    spec = json.loads(tk.to_str())
    # Byte tokens belong to the model's vocabulary, not to added_tokens (as in Llama 2's file).
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in byte_tokens]
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return folder


@pytest.fixture(scope="module")
def spm_style(tmp_path_factory):
    folder = train_spm_style_json(tmp_path_factory.mktemp("spm_json"))
    return Tokenizer.from_file(folder / "tokenizer.json"), tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))


def test_bos_eos_from_post_processor_template_without_config(tmp_path):
    from tokenizers import processors

    train_spm_style_json(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    assert Tokenizer.from_file(tmp_path).bos_id is None
    lib = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    lib.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    lib.save(str(tmp_path / "tokenizer.json"))
    ours = Tokenizer.from_file(tmp_path)
    assert (ours.bos_id, ours.eos_id) == (1, 2)
    assert ours.encode("ab cd", bos=True, eos=True) == lib.encode("ab cd", add_special_tokens=True).ids


def test_spm_style_tables(spm_style):
    ours, _ = spm_style
    assert (ours.bos_id, ours.eos_id, ours.stop_ids) == (1, 2, frozenset({2}))
    assert ours.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}
    assert ours.strips_leading_space and ours.replaces_per_byte


@pytest.mark.parametrize("name", sorted(CORPUS) + ["emoji_26k", "spaces_50k"])
def test_spm_style_ids_match_library(spm_style, name):
    ours, lib = spm_style
    text = {**CORPUS, **LONG_RUNS}[name]
    if "<s>" not in text and "</s>" not in text and "<unk>" not in text:
        assert ours.encode(text) == lib.encode(text, add_special_tokens=False).ids
    ids = ours.encode(text, bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1] and 2 not in ids[1:-1]
    assert ours.decode(ids[1:-1]) == text


def test_spm_style_byte_fallback_and_stream(spm_style):
    ours, lib = spm_style
    # A private-use character no training corpus holds must fall back to its UTF-8 bytes.
    # (An emoji from the corpus may be learned as a piece, depending on the trainer's tie-breaking.)
    rare = "\U000F0041"
    assert [lib.id_to_token(i) for i in ours.encode(rare)][-4:] == [f"<0x{b:02X}>" for b in rare.encode()]
    for name, text in sorted(CORPUS.items()):
        for ids in (ours.encode(text), ours.encode(text, bos=True, eos=True)):
            stream = StreamDecoder(ours)
            assert "".join(stream.push(i) for i in ids) + stream.flush() == lib.decode(ids, skip_special_tokens=False), name
            stream = StreamDecoder(ours, skip_special=True)
            assert "".join(stream.push(i) for i in ids) + stream.flush() == lib.decode(ids, skip_special_tokens=True), name
    byte_id = {b: lib.token_to_id(f"<0x{b:02X}>") for b in range(256)}
    rng = random.Random(2)
    for _ in range(300):
        raw = bytes(rng.choice([0x41, 0x80, 0xBF, 0xC3, 0xA9, 0xE2, 0x82, 0xF0, 0x9F, 0xFF]) for _ in range(rng.randint(1, 8)))
        ids = [byte_id[b] for b in raw]
        stream = StreamDecoder(ours)
        streamed = "".join(stream.push(i) for i in ids) + stream.flush()
        assert ours.decode(ids) == lib.decode(ids)
        try:
            assert streamed == lib.decode(ids) == raw.decode("utf-8")
        except UnicodeDecodeError:
            # Invalid bytes: the library replaces every byte of the whole byte-token run once any of it is
            # invalid, which a stream cannot do without taking back text it already gave. The stream gives
            # one U+FFFD per invalid byte and keeps the valid characters.
            assert streamed == raw.decode("utf-8", "llamaherd.per_byte_replace")
            assert len(streamed) <= len(lib.decode(ids))


def test_lone_surrogates_never_raise(spm_style):
    ours, lib = spm_style
    for text in LONE_SURROGATES.values():
        ids = ours.encode(text)
        assert "\ufffd" in ours.decode(ids)


def test_folder_prefers_tokenizer_json(tmp_path):
    folder = tmp_path / "both"
    folder.mkdir()
    train_spm_style_json(folder)
    (folder / "tokenizer.model").write_text("not even a tokenizer")
    assert Tokenizer.from_file(folder).kind == "hf"


def test_malformed_json_raises(tmp_path):
    cases = {"truncated.json": '{"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0', "wrongschema.json": '{"model": 5}'}
    for name, content in cases.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(TokenizerError, match=name):
            Tokenizer.from_file(tmp_path / name)
    good = tmp_path / "cfg"
    good.mkdir()
    train_spm_style_json(good)
    (good / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        Tokenizer.from_file(good)


@pytest.mark.slow
def test_llama4_converted_json_matches_meta(tmp_path):
    from llama_models.llama4.tokenizer import Tokenizer as Meta4
    from transformers.convert_slow_tokenizer import TikTokenConverter

    meta = Meta4.get_instance()
    model_file = str(__import__("llama_models").__path__[0]) + "/llama4/tokenizer.model"
    TikTokenConverter(
        vocab_file=model_file, pattern=Meta4.O200K_PATTERN, extra_special_tokens=list(meta.special_tokens)
    ).converted().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot|>"}))
    ours = Tokenizer.from_file(tmp_path)
    assert ours.special_tokens == meta.special_tokens and ours.vocab_size == meta.n_words
    assert ours.stop_ids == frozenset(meta.stop_tokens)
    for name, text in sorted({**CORPUS, **LONE_SURROGATES}.items()):
        assert ours.encode(text, bos=True) == meta.encode(text, bos=True, eos=False), name
    ids = ours.encode(CORPUS["all"])
    stream = StreamDecoder(ours)
    assert "".join(stream.push(i) for i in ids) + stream.flush() == meta.decode(ids) == CORPUS["all"]
