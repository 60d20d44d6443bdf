"""GGUF writing for Gemma 3 (the default model's architecture): names, norm offsets, metadata, requantizing.

The source files are laid out as llama.cpp's converter writes Gemma 3 (tests/store_fixtures.py); gguf-py's
reader and its reference quantizer are the oracles. The slow test runs llama.cpp itself on the default model.
"""

from __future__ import annotations

import logging

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import llamaherd
from llamaherd.checkpoint.gguf import read as gguf_read
from llamaherd.checkpoint.gguf_write import write
from llamaherd.cli import main as herd
from tests.gguf_write_fixtures import read_field, read_tensors
from tests.store_fixtures import TINY_GEMMA, random_gemma_state, write_tiny_gemma_gguf

# Keys the converter's layout states (store_fixtures.write_tiny_gemma_gguf); ours must state them alike.
GEMMA_KEYS = ["general.architecture", "gemma3.context_length", "gemma3.embedding_length", "gemma3.block_count",
              "gemma3.feed_forward_length", "gemma3.attention.head_count", "gemma3.attention.head_count_kv",
              "gemma3.attention.key_length", "gemma3.attention.value_length",
              "gemma3.attention.layer_norm_rms_epsilon", "gemma3.rope.freq_base", "gemma3.attention.sliding_window",
              "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.bos_token_id",
              "tokenizer.ggml.eos_token_id"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_tiny_gemma_gguf(tmp_path_factory.mktemp("gemma") / "f32.gguf", random_gemma_state())


def test_f32_gemma_gguf_reproduces_the_converters_layout(source, tmp_path):
    """Read then written as F32: the same tensors under the same names (norms stored as 1 + w), the same keys."""
    out = write(gguf_read(source), tmp_path / "out.gguf", qtype="f32")
    theirs, ours = read_tensors(source), read_tensors(out)
    assert set(ours) == set(theirs)
    for name, (qtype, data) in theirs.items():
        assert ours[name][0] == Q.F32 and np.array_equal(ours[name][1], data), name
    src_reader, out_reader = gguf.GGUFReader(source), gguf.GGUFReader(out)
    for key in GEMMA_KEYS:
        want, got = read_field(src_reader, key), read_field(out_reader, key)
        assert got == pytest.approx(want) if isinstance(want, float) else got == want, key
    assert gguf_read(out).config == gguf_read(source).config == TINY_GEMMA


def test_q8_0_gemma_gguf_bytes_are_gguf_pys_quantization(source, tmp_path):
    out = tmp_path / "q8.gguf"
    assert herd(["quantize", str(source), str(out), "--type", "q8_0", "--quiet"]) == 0
    theirs, ours = read_tensors(source), read_tensors(out)
    checked = 0
    for name, (qtype, data) in ours.items():
        if qtype == Q.Q8_0:
            assert np.array_equal(gguf.quants.quantize(theirs[name][1], Q.Q8_0), data), name
            checked += 1
        else:  # norms, and rows (48) that Q8_0's 32-element blocks do not divide: llama.cpp falls back to F16
            assert qtype in (Q.F32, Q.F16), (name, qtype)
    assert checked >= 1 + 4 * TINY_GEMMA.n_layers  # token_embd and the q/k/v/o projections at least
    back = llamaherd.load(out)
    ids = [2, 17, 200, 3, 99, 45, 250, 128, 7, 7, 31]
    ref = llamaherd.load(source).logits(ids)
    assert torch.equal(back.logits(ids).argmax(-1), ref.argmax(-1))


def test_requantized_gemma_keeps_its_vocabulary_and_warns(source, tmp_path, caplog):
    q8 = write(gguf_read(source), tmp_path / "q8.gguf", qtype="q8_0")
    with caplog.at_level(logging.WARNING):
        out = write(gguf_read(q8), tmp_path / "q4.gguf", qtype="q4_0")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING][0].startswith("q8.gguf holds")
    tokens = "tokenizer.ggml.tokens"
    assert read_field(gguf.GGUFReader(out), tokens) == read_field(gguf.GGUFReader(source), tokens)
    assert gguf_read(out).config == TINY_GEMMA


@pytest.mark.slow
def test_default_model_requantized_to_q8_0_keeps_llama_cpps_top1(tmp_path):
    """`herd quantize <default> x.gguf --type q8_0`: llama.cpp's next token on a few prompts equals the original's."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from llamaherd.api import resolve
    from llamaherd.store import DEFAULT_MODEL

    original = resolve(DEFAULT_MODEL)
    out = tmp_path / "q8.gguf"
    assert herd(["quantize", DEFAULT_MODEL, str(out), "--type", "q8_0", "--quiet"]) == 0
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "The quick brown fox"]

    def top1(path) -> list[int]:
        m = llama_cpp.Llama(str(path), n_ctx=128, n_threads=2, verbose=False)
        picks = []
        for p in prompts:
            ids = m.tokenize(p.encode(), add_bos=True)
            m.reset()
            m.eval(ids)
            picks.append(int(np.argmax(m.scores[len(ids) - 1])))
        return picks

    assert top1(out) == top1(original)
