"""Our GGUF files in llama.cpp (llama-cpp-python): logits agree with ours, and our quantizers match llama.cpp's.

Slow: a Llama 3 shaped random model with the official 128,256-token vocabulary is written several times.
Run with `pytest -m slow tests/test_llamacpp_interop.py -s` to see the measured numbers.
"""

from __future__ import annotations

import ctypes
import math

import numpy as np
import pytest
import torch
import gguf
from gguf import GGMLQuantizationType as Q

import llamaherd
from llamaherd.checkpoint.gguf_write import write
from llamaherd.config import ModelConfig, RopeScaling
from llamaherd.model import build
from llamaherd.tokenizer import Tokenizer
from tests.gguf_write_fixtures import checkpoint, dequantized, read_tensors

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.slow

TEXT = "The quick brown fox jumps over the lazy dog; 12345 times, über café!"

# (max, mean) |logit difference| allowed, llama.cpp vs our float model on the same dequantized weights, for
# logits of std ~0.8 over 128,256 x 20 positions. llama.cpp keeps the KV cache in F16 and, for quantized
# weights, quantizes activations to 8 bits (Q8_0 / Q8_K) before each dot product, so the quantized types get
# more room. A wrong bit layout moves logits by their whole spread (~0.8), far outside these bounds.
TOLERANCE = {"f32": (0.02, 0.002), "f16": (0.02, 0.002), "q8_0": (0.15, 0.02), "q4_0": (0.15, 0.02), "q4_k_m": (0.15, 0.02)}

# llama.cpp file types (gguf-py LlamaFileType) for llama_model_quantize
LLAMA_FTYPE = {"q8_0": 7, "q4_0": 2, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}

_GGUF_TO_META = {
    "token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight", "output.weight": "output.weight",
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
}


def _meta_name(name: str) -> str:
    if name in _GGUF_TO_META:
        return _GGUF_TO_META[name]
    _, layer, part, w = name.split(".")
    return f"layers.{layer}.{_GGUF_TO_META[part]}.{w}"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.llama3()


@pytest.fixture(scope="module")
def config(tok):
    # Llama 3.1 shaped (GQA, theta 5e5, llama3 rope scaling -> rope_freqs tensor); FFN 640 is not a multiple
    # of 256, so ffn_down takes llama.cpp's fallback types in the k-quant mixes.
    return ModelConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, hidden_dim=640,
                       rope_theta=500000.0, max_seq_len=131072, rope_scaling=RopeScaling(factor=8.0))


@pytest.fixture(scope="module")
def ckpt(config, tok):
    return checkpoint(config, tokenizer=tok, std=0.05, seed=3)


@pytest.fixture(scope="module")
def f32_file(ckpt, tmp_path_factory):
    return write(ckpt, tmp_path_factory.mktemp("gguf") / "model-f32.gguf", qtype="f32")


def _llama_cpp_logits(path, ids: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(str(path), logits_all=True, n_threads=2, verbose=False, n_ctx=64)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def _float_model_logits(path, config, ids: list[int]) -> np.ndarray:
    """Our decoder run on the file's weights as gguf-py decodes them (independent of our reader)."""
    sd = {_meta_name(n): t for n, t in dequantized(path).items() if n != "rope_freqs.weight"}
    net = build(config, device="meta")
    net.load_state_dict(sd, strict=True, assign=True)
    with torch.no_grad():
        return net.eval()(torch.tensor([ids]))[0].numpy()


def test_llama_cpp_tokenizes_like_us(f32_file, tok):
    llm = llama_cpp.Llama(str(f32_file), vocab_only=True, verbose=False)
    try:
        for text in (TEXT, "  leading spaces\n\nand\ttabs 3.14159 ", "日本語のテキスト 🦙"):
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
            assert llm.detokenize(tok.encode(text)).decode() == text
    finally:
        llm.close()


def _llama_cpp_quantize(src, dst, ftype: str):
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPE[ftype]
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return dst


@pytest.mark.parametrize("ftype", list(TOLERANCE))
def test_logits_match_llama_cpp(ckpt, config, tok, f32_file, ftype, tmp_path):
    path = write(ckpt, tmp_path / f"model-{ftype}.gguf", qtype=ftype)
    ids = [tok.bos_id, *tok.encode(TEXT)]
    ref = _llama_cpp_logits(path, ids)
    ours = _float_model_logits(path, config, ids)
    via_reader = llamaherd.load(path).logits(ids).numpy()  # our reader + quantized linears
    max_tol, mean_tol = TOLERANCE[ftype]
    diff, mean = float(np.abs(ours - ref).max()), float(np.abs(ours - ref).mean())
    diff_reader, mean_reader = float(np.abs(via_reader - ref).max()), float(np.abs(via_reader - ref).mean())
    agree = float((ours.argmax(-1) == ref.argmax(-1)).mean())
    print(f"\n{ftype}: logits std {ref.std():.3f}; |ours - llama.cpp| max {diff:.5f} mean {mean:.5f} "
          f"(via reader: max {diff_reader:.5f} mean {mean_reader:.5f}); argmax agreement {agree:.2f}; "
          f"tolerance max {max_tol} mean {mean_tol}")
    assert diff < max_tol and mean < mean_tol
    assert diff_reader < max_tol and mean_reader < mean_tol
    if ftype not in LLAMA_FTYPE:
        assert agree >= 0.9
    else:
        # Baseline: the same comparison on llama.cpp's own quantization of the same weights. Our file may
        # not disagree with llama.cpp's runtime more than llama.cpp's file does. The argmax is compared with
        # the baseline's, not with a fixed rate: llama.cpp rounds each activation row to 8 bits (one scale per
        # 256 for the K-quants), which flips near-ties of this random model (q4_k_m: 17 of 19 agree on our file).
        theirs = _llama_cpp_quantize(f32_file, tmp_path / f"llamacpp-{ftype}.gguf", ftype)
        float_theirs, cpp_theirs = _float_model_logits(theirs, config, ids), _llama_cpp_logits(theirs, ids)
        gap = np.abs(float_theirs - cpp_theirs)
        agree_theirs = float((float_theirs.argmax(-1) == cpp_theirs.argmax(-1)).mean())
        print(f"{ftype}: baseline on llama.cpp's own {ftype} file: max {gap.max():.5f} mean {gap.mean():.5f}; "
              f"argmax agreement {agree_theirs:.2f}")
        assert diff <= 1.5 * gap.max() + 0.01 and mean <= 1.5 * gap.mean() + 0.002
        assert agree >= min(0.9, agree_theirs) - 1.5 / len(ids)  # one position more than llama.cpp's own file
        assert agree >= 0.8


def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


@pytest.fixture(scope="module")
def quality_ckpt():
    # No vocabulary needed (llama_model_quantize reads hyperparameters and tensors only): a small embedding
    # keeps this fast; 8 layers give use_more_bits a pattern (layers 0, 3, 6, 7) rather than a single pick.
    c = ModelConfig(dim=256, n_layers=8, n_heads=4, n_kv_heads=2, vocab_size=4096, hidden_dim=640,
                    rope_theta=500000.0, max_seq_len=8192)
    return checkpoint(c, std=0.05, seed=4)


@pytest.mark.parametrize("ftype", ["q4_k_m", "q5_k_m", "q6_k", "q8_0", "q4_0"])
def test_quantizer_quality_vs_llama_cpp(quality_ckpt, ftype, tmp_path):
    """llama.cpp quantizes our F32 file; we write the same type: same per-tensor types, RMSE no worse."""
    ckpt = quality_ckpt
    f32_file = write(ckpt, tmp_path / "f32.gguf", qtype="f32")
    ref_path = _llama_cpp_quantize(f32_file, tmp_path / f"llamacpp-{ftype}.gguf", ftype)
    ours_path = write(ckpt, tmp_path / f"ours-{ftype}.gguf", qtype=ftype)

    ref_types = {n: t for n, (t, _) in read_tensors(ref_path).items()}
    our_types = {n: t for n, (t, _) in read_tensors(ours_path).items()}
    assert our_types == ref_types  # the mix: llama_tensor_get_type's choices, fallbacks included

    ref_w, our_w = dequantized(ref_path), dequantized(ours_path)
    src = dequantized(f32_file)
    print(f"\n{ftype}: tensor type  rmse(ours)  rmse(llama.cpp)  identical-bytes")
    ref_raw, our_raw = read_tensors(ref_path), read_tensors(ours_path)
    sse_ours = sse_theirs = 0.0
    for name, x in src.items():
        if ref_types[name] in (Q.F32, Q.F16):
            torch.testing.assert_close(our_w[name], ref_w[name], rtol=0, atol=0)
            continue
        ours, theirs = _rmse(our_w[name], x), _rmse(ref_w[name], x)
        sse_ours += ours**2 * x.numel()
        sse_theirs += theirs**2 * x.numel()
        same = float((ref_raw[name][1] == our_raw[name][1]).mean())
        print(f"  {name:<26} {ref_types[name].name:<5} {ours:.6e} {theirs:.6e} {same:.4f}")
        # The same search as llama.cpp's; where two candidate scales have near-equal error, summation order
        # (torch reductions vs C's sequential, possibly fused, float sums) picks either, so single tensors
        # land a little either side.
        assert ours <= theirs * (1 + 5e-3), name
    print(f"  all quantized tensors: rmse ratio ours/llama.cpp {math.sqrt(sse_ours / sse_theirs):.6f}")
    assert sse_ours <= sse_theirs * (1 + 1e-3)


def test_llama2_sentencepiece_model_in_llama_cpp(tmp_path):
    """A Llama 2 shaped model (MHA, theta 1e4) with a SentencePiece vocab ("llama" model, scores, byte tokens)."""
    from tests.test_tokenizer_spm import train_spm

    sp = Tokenizer.from_file(train_spm(tmp_path))
    c = ModelConfig(dim=256, n_layers=2, n_heads=4, vocab_size=sp.vocab_size, hidden_dim=512, rope_theta=10000.0,
                    max_seq_len=4096)
    path = write(checkpoint(c, tokenizer=sp, std=0.05, seed=5), tmp_path / "llama2-f16.gguf", qtype="f16")
    text = "hello world 2024 abc defg"
    llm = llama_cpp.Llama(str(path), logits_all=True, n_threads=2, verbose=False, n_ctx=64)
    try:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == sp.encode(text)
        ids = [sp.bos_id, *sp.encode(text)]
        llm.eval(ids)
        ref = np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()
    ours = _float_model_logits(path, c, ids)
    diff = float(np.abs(ours - ref).max())
    print(f"\nllama2 sentencepiece f16: max|ours - llama.cpp| {diff:.5f}")
    assert diff < TOLERANCE["f16"][0]
