"""GGUF writer: metadata, tensor names and types, round trips through reference decoders, vocab, `herd quantize`."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import gguf
from gguf import GGMLQuantizationType as Q
from llama_models.llama3.model import apply_scaling
from transformers.convert_slow_tokenizer import TikTokenConverter

from llamaherd.checkpoint import meta_pth
from llamaherd.quant import ggml_quants
from llamaherd.checkpoint.gguf import read as gguf_read
from llamaherd.quant.ggml import GGMLWeight
from llamaherd.checkpoint.gguf_write import byte_to_unicode, bpe_merges, gguf_name, tensor_type, write
from llamaherd.quant.quantize import quantize
from llamaherd.cli import main as herd
from llamaherd.errors import CheckpointError
from llamaherd.tokenizer import Tokenizer
from tests.gguf_write_fixtures import KQ_LLAMA3, KQ_LLAMA31, checkpoint, dequantized, read_field, read_tensors

FILE_TYPES = ["f32", "f16", "q8_0", "q4_0", "q4_k_m"]

# Expected types for KQ_LLAMA3 (2 layers, dim 256, ffn 384) derived by hand from llama.cpp's
# llama_tensor_get_type: use_more_bits(i, 2) picks layer 1 (i >= 7*2//8); ffn_down rows (384) are not a
# multiple of 256, so Q4_K falls back to Q5_0 and Q6_K to Q8_0; output gets Q6_K in every mix but Q8_0.
Q4_K_M_TYPES = {
    "token_embd.weight": Q.Q4_K, "output.weight": Q.Q6_K, "output_norm.weight": Q.F32,
    **{f"blk.{i}.attn_v.weight": Q.Q6_K if i >= 1 else Q.Q4_K for i in range(2)},
    **{f"blk.{i}.ffn_down.weight": Q.Q8_0 if i >= 1 else Q.Q5_0 for i in range(2)},
    **{f"blk.{i}.{n}.weight": Q.Q4_K for i in range(2) for n in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up")},
    **{f"blk.{i}.{n}.weight": Q.F32 for i in range(2) for n in ("attn_norm", "ffn_norm")},
}


@pytest.fixture(scope="module")
def ckpt():
    return checkpoint(KQ_LLAMA3)


@pytest.mark.parametrize("ftype", FILE_TYPES)
def test_round_trip_decodes_to_our_quantizer(ckpt, ftype, tmp_path):
    """Every tensor read back and decoded (gguf-py and quant/ggml_quants.py) equals our quantizer's output."""
    path = write(ckpt, tmp_path / f"m-{ftype}.gguf", qtype=ftype)
    tensors = read_tensors(path)
    c = ckpt.config
    assert len(tensors) == len(ckpt.state_dict)
    for meta_name, src in ckpt.state_dict.items():
        name, _ = gguf_name(meta_name)
        qtype, data = tensors[name]
        if ftype == "q4_k_m":
            assert qtype == Q4_K_M_TYPES[name], name
        _, expected = quantize(src, qtype)
        ref = torch.from_numpy(np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32).copy())
        assert tuple(ref.shape) == tuple(src.shape), name
        torch.testing.assert_close(ref, expected, rtol=0, atol=0, msg=name)
        raw = torch.from_numpy(data.view(np.uint8).reshape(*src.shape[:-1], -1).copy())
        torch.testing.assert_close(ggml_quants.dequantize(raw, qtype.name).reshape(src.shape), expected, rtol=0, atol=0)
    # our reader: same config back, every weight decodes to our quantizer's values
    back = gguf_read(path)
    assert back.config == c
    for meta_name, src in ckpt.state_dict.items():
        t = back.state_dict[meta_name]
        t = t.dequantize() if isinstance(t, GGMLWeight) else t.to(torch.float32)
        _, expected = quantize(src, tensors[gguf_name(meta_name)[0]][0])
        torch.testing.assert_close(t, expected, rtol=0, atol=0, msg=meta_name)
    r = gguf.GGUFReader(path)
    assert read_field(r, "general.architecture") == "llama"
    assert read_field(r, "llama.block_count") == c.n_layers
    assert read_field(r, "llama.embedding_length") == c.dim
    assert read_field(r, "llama.feed_forward_length") == c.hidden_dim
    assert read_field(r, "llama.attention.head_count") == c.n_heads
    assert read_field(r, "llama.attention.head_count_kv") == c.n_kv_heads
    assert read_field(r, "llama.rope.dimension_count") == c.head_dim
    assert read_field(r, "llama.context_length") == c.max_seq_len
    assert read_field(r, "llama.vocab_size") == c.vocab_size
    assert math.isclose(read_field(r, "llama.rope.freq_base"), c.rope_theta)
    assert math.isclose(read_field(r, "llama.attention.layer_norm_rms_epsilon"), c.norm_eps, rel_tol=1e-6)
    expected_ft = {"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2, "q4_k_m": 15}[ftype]  # gguf-py LlamaFileType
    assert read_field(r, "general.file_type") == expected_ft


def test_mix_rules_for_q5_k_m_q6_k_and_tied_output():
    kw = dict(layer=None, n_layers=32, has_output=True)
    assert tensor_type("output.weight", (128256, 4096), "q5_k_m", **kw) == Q.Q6_K
    assert tensor_type("output.weight", (128256, 4096), "q8_0", **kw) == Q.Q8_0
    assert tensor_type("output.weight", (32000, 4000), "q4_k_m", **kw) == Q.Q8_0  # 4000 % 256 != 0
    assert tensor_type("token_embd.weight", (128256, 4096), "q4_k_m", **kw) == Q.Q4_K
    assert tensor_type("token_embd.weight", (128256, 2048), "q4_k_m", **{**kw, "has_output": False}) == Q.Q6_K
    # use_more_bits(i, 32): i < 4, i >= 28, and (i - 4) % 3 == 2 -> 6, 9, ...
    picks = [i for i in range(32) if tensor_type(f"blk.{i}.attn_v.weight", (1024, 4096), "q5_k_m", **{**kw, "layer": i}) == Q.Q6_K]
    assert picks == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert tensor_type("blk.5.ffn_down.weight", (4096, 14336), "q5_k_m", **{**kw, "layer": 5}) == Q.Q5_K
    assert tensor_type("blk.11.attn_v.weight", (1024, 8192), "q4_k_m", layer=11, n_layers=80, has_output=True) == Q.Q5_K
    assert tensor_type("blk.5.attn_q.weight", (4096, 4096), "q6_k", **{**kw, "layer": 5}) == Q.Q6_K
    assert tensor_type("blk.5.attn_norm.weight", (4096,), "q6_k", **{**kw, "layer": 5}) == Q.F32
    assert tensor_type("blk.5.attn_q.weight", (100, 100), "q4_0", **{**kw, "layer": 5}) == Q.F16  # 100 % 32 != 0


def test_llama31_rope_freqs_reproduce_metas_scaling(tmp_path):
    """llama.cpp divides theta^(-2i/d) by rope_freqs: that must equal Meta's `apply_scaling` frequencies."""
    path = write(checkpoint(KQ_LLAMA31), tmp_path / "m.gguf", qtype="f32")
    qtype, factors = read_tensors(path)["rope_freqs.weight"]
    assert qtype == Q.F32 and factors.shape == (KQ_LLAMA31.head_dim // 2,)
    d = KQ_LLAMA31.head_dim
    base = 1.0 / (KQ_LLAMA31.rope_theta ** (torch.arange(0, d, 2)[: d // 2].float() / d))
    torch.testing.assert_close(base / torch.from_numpy(factors.copy()), apply_scaling(base), rtol=1e-6, atol=0)


def test_llama3_merges_match_transformers_conversion():
    """Merges from tiktoken ranks equal transformers' TikTokenConverter (the tokenizer.json Meta ships)."""
    tok = Tokenizer.llama3()
    specials = set(tok.special_tokens.values())
    ranks = {tok.token_bytes(i): i for i in range(tok.vocab_size) if i not in specials}
    u = byte_to_unicode()
    ours = [("".join(u[c] for c in a), "".join(u[c] for c in b)) for a, b in bpe_merges(ranks)]
    _, ref = TikTokenConverter().extract_vocab_merges_from_model(str(tok.source))
    assert ours == ref


def test_byte_level_vocab_tables():
    from llamaherd.checkpoint.gguf_write import _vocab_byte_level

    tok = Tokenizer.llama3()
    v = _vocab_byte_level(tok, tok.vocab_size)
    assert v["tokens"][tok.encode(" hello")[0]] == "Ġhello"  # GPT-2 spelling of the leading space
    assert v["tokens"][128009] == "<|eot_id|>" and v["types"][128009] == gguf.TokenType.CONTROL
    assert v["tokens"][tok.encode("\n")[0]] == "Ċ"
    assert len(set(v["tokens"])) == len(v["tokens"])


@pytest.mark.slow
def test_vocab_metadata_llama3(tmp_path):
    tok = Tokenizer.llama3()
    c = KQ_LLAMA3.replace(vocab_size=tok.vocab_size + 2)  # a padded embedding, as some checkpoints have
    ck = checkpoint(c, std=0.02, tokenizer=tok)
    ck.chat_template = "{{ messages }}"
    r = gguf.GGUFReader(write(ck, tmp_path / "v.gguf", qtype="q8_0"))
    assert read_field(r, "tokenizer.ggml.model") == "gpt2"
    assert read_field(r, "tokenizer.ggml.pre") == "llama-bpe"
    tokens = read_field(r, "tokenizer.ggml.tokens")
    types = read_field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == c.vocab_size
    assert tokens[128000] == "<|begin_of_text|>" and types[128000] == gguf.TokenType.CONTROL
    assert tokens[128257] == "[PAD128257]" and types[128257] == gguf.TokenType.UNUSED
    assert tokens[tok.encode(" hello")[0]] == "Ġhello"  # GPT-2 byte-level spelling of the space
    assert read_field(r, "tokenizer.ggml.bos_token_id") == 128000
    assert read_field(r, "tokenizer.ggml.eot_token_id") == tok.special_id("eot_id")
    assert len(read_field(r, "tokenizer.ggml.merges")) == 280147  # merges in Meta's Llama 3 tokenizer.json
    assert read_field(r, "tokenizer.chat_template") == "{{ messages }}"


def test_bad_requests_raise_typed_errors(ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="unknown GGUF type 'q3_k'"):
        write(ckpt, tmp_path / "x.gguf", qtype="q3_k")
    bad = checkpoint(KQ_LLAMA3)
    bad.state_dict["layers.0.attention.bogus.weight"] = torch.zeros(2, 2)
    with pytest.raises(CheckpointError, match="bogus"):
        write(bad, tmp_path / "x.gguf")


def test_herd_quantize_from_meta_folder(ckpt, tmp_path, capsys):
    src = tmp_path / "meta"
    meta_pth.write(ckpt, src)
    out = tmp_path / "q.gguf"
    assert herd(["quantize", str(src), str(out), "--type", "q4_k_m"]) == 0
    assert "q4_k_m" in capsys.readouterr().out
    types = {n: t for n, (t, _) in read_tensors(out).items()}
    assert types == Q4_K_M_TYPES


@pytest.mark.slow
def test_herd_quantize_from_f16_gguf_keeps_config_and_vocab(tmp_path):
    """An F16 GGUF (read by our reader) requantizes to Q8_0 with the same config and vocabulary."""
    tok = Tokenizer.llama3()
    c = KQ_LLAMA31.replace(vocab_size=tok.vocab_size, dim=32, hidden_dim=64, head_dim=8)
    src = write(checkpoint(c, tokenizer=tok), tmp_path / "src.gguf", qtype="f16")
    out = tmp_path / "q8.gguf"
    assert herd(["quantize", str(src), str(out), "--type", "q8_0", "--quiet"]) == 0
    back = gguf_read(out)
    assert back.config == c
    assert back.tokenizer.encode("Hello, world!") == tok.encode("Hello, world!")
    types = {n: t for n, (t, _) in read_tensors(out).items()}
    assert types["blk.0.attn_q.weight"] == Q.Q8_0 and types["output.weight"] == Q.Q8_0


def test_requantizing_a_quantized_gguf_warns_once_and_matches_gguf_py(ckpt, tmp_path, caplog):
    """Q8_0 -> Q4_0 as `llama-quantize --allow-requantize` does it: every tensor decoded, then quantized again.

    The bytes must equal gguf-py's own dequantize of the source file followed by its quantize, and one warning
    line names the source types and the compounded error.
    """
    src = write(ckpt, tmp_path / "q8.gguf", qtype="q8_0")
    out = tmp_path / "q4.gguf"
    with caplog.at_level(logging.WARNING):
        assert herd(["quantize", str(src), str(out), "--type", "q4_0", "--quiet"]) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and "Q8_0" in warned[0] and "rounding error" in warned[0], warned
    source, result = read_tensors(src), read_tensors(out)
    assert set(source) == set(result)
    checked = 0
    for name, (qtype, raw) in result.items():
        if qtype not in (Q.Q4_0, Q.Q8_0):  # the output tensor gets Q6_K, which gguf-py does not quantize
            continue
        values = gguf.quants.dequantize(source[name][1], source[name][0])
        assert np.array_equal(gguf.quants.quantize(values, qtype), raw), name
        checked += 1
    assert checked >= 14


def test_float_output_from_a_quantized_gguf_decodes_with_one_warning(ckpt, tmp_path, caplog):
    """`herd convert q8.gguf --to hf --dtype bf16`: the weights are gguf-py's decoding of the file, rounded to bf16."""
    from llamaherd.checkpoint import hf

    src = write(ckpt, tmp_path / "q8.gguf", qtype="q8_0")
    with caplog.at_level(logging.WARNING):
        assert herd(["convert", str(src), str(tmp_path / "hf"), "--to", "hf", "--dtype", "bf16"]) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and "Q8_0" in warned[0] and "hf output" in warned[0], warned
    back = hf.read(tmp_path / "hf")
    reference = dequantized(src)  # gguf-py's decoder, GGUF names
    assert back.state_dict["layers.1.attention.wv.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(back.state_dict["layers.1.attention.wv.weight"],
                               reference["blk.1.attn_v.weight"].to(torch.bfloat16), rtol=0, atol=0)
