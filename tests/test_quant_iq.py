"""Q3_K, IQ4_XS and IQ4_NL: our quantizers and decoders against llama.cpp's (libggml's ggml_quantize_chunk,
llama_model_quantize, the llama.cpp runtime) and gguf-py's decoder; the q3_k_*/iq4_xs mixes; and `herd quantize
--type int8|int4[-gN]` writing the weight-only folder."""

from __future__ import annotations

import ctypes

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import llamaherd
from llamaherd.checkpoint.gguf_write import tensor_type, write
from llamaherd.config import ModelConfig
from llamaherd.quant import ggml_quants
from llamaherd.quant.quantize import quantize
from tests.gguf_write_fixtures import KQ_LLAMA3, checkpoint, dequantized, read_tensors
from tests.test_cli_chat import tiny_folder  # noqa: F401  (a fixture: a Llama 3 folder with its tokenizer)
from tests.test_kquants import _data
from tests.test_quant_imatrix import _libggml, _weights_and_importance, llama_cpp_quantize

TYPES = (Q.Q3_K, Q.IQ4_XS, Q.IQ4_NL)


def _blocks(raw: np.ndarray, qtype: Q) -> np.ndarray:
    return raw.reshape(-1, gguf.GGML_QUANT_SIZES[qtype][1])


def _decode_both(raw: np.ndarray, qtype: Q) -> tuple[np.ndarray, np.ndarray]:
    """gguf-py's decoding and ours (quant/ggml_quants.py, what the runtime uses) of the same bytes."""
    ours = ggml_quants.dequantize(torch.from_numpy(np.ascontiguousarray(raw)), qtype.name).numpy()
    return gguf.quants.dequantize(raw, qtype).reshape(ours.shape), ours


# -- (a) decoding: ours equals gguf-py's, on our blocks and on llama.cpp's ----------------------------------------


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_decoders_agree_on_our_and_llama_cpp_blocks(qtype):
    lib = _libggml()
    x, imp = _weights_and_importance(seed=7)
    x = torch.cat([x, _data(rows=8)])  # zeros, constants, an outlier, one-signed rows
    for importance in (None, torch.cat([imp, imp])[: x.shape[1]]):
        raw, recon = quantize(x, qtype, importance)
        ref, ours = _decode_both(raw, qtype)
        np.testing.assert_array_equal(ref, recon.numpy())
        np.testing.assert_array_equal(ours, recon.numpy())
        theirs = llama_cpp_quantize(lib, x.numpy(), qtype, None if importance is None else importance.numpy())
        ref, ours = _decode_both(theirs, qtype)
        np.testing.assert_array_equal(ours, ref)


# -- (b) quantizing: llama.cpp's bytes, or no more error where float summation order decides a near tie ------------


def test_q3_k_reference_quantizer_is_byte_identical():
    """quantize_row_q3_K_ref (make_q3_quants, 6-bit scales) is deterministic: every block equals llama.cpp's."""
    lib = _libggml()
    for x in (_data(seed=3), _weights_and_importance(seed=4)[0]):
        raw, _ = quantize(x, Q.Q3_K)
        np.testing.assert_array_equal(raw, llama_cpp_quantize(lib, x.numpy(), Q.Q3_K, None))


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_quantizers_against_ggml_quantize_chunk(qtype, weighted):
    """Nearly every block byte-identical to llama.cpp's; the rest are near ties of the scale search (a constant
    block fits two grids exactly; sums in another order pick the other one): error within 1% of llama.cpp's."""
    lib = _libggml()
    x, imp = _weights_and_importance(seed=5)
    x = torch.cat([x, _data(rows=16, seed=6)])
    importance = imp if weighted else None
    raw, recon = quantize(x, qtype, importance)
    theirs = llama_cpp_quantize(lib, x.numpy(), qtype, None if importance is None else importance.numpy())
    ref = torch.from_numpy(gguf.quants.dequantize(theirs, qtype)).reshape(x.shape)
    w = imp if weighted else torch.ones_like(imp)
    err_ours, err_ref = float(((recon - x) ** 2 * w).sum()), float(((ref - x) ** 2 * w).sum())
    same = float((_blocks(raw, qtype) == _blocks(theirs, qtype)).all(1).mean())
    assert err_ours <= 1.01 * err_ref, (err_ours, err_ref)
    assert same >= 0.95, f"only {same:.1%} of the blocks equal llama.cpp's"


# That the importance weights lower the weighted error is tests/test_quant_imatrix.py's
# test_importance_lowers_the_weighted_error, over quantize.WEIGHTED (these three types included).


def test_error_ladder():
    """Q3_K (3.44 bits per weight) loses more than Q4_K and IQ4_XS (4.5 and 4.25); IQ4_NL (4.5 bits, a scale per
    32) no more than IQ4_XS (6-bit scales per 32 under one fp16 per 256)."""
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(9)) * 0.02
    rmse = {q: float((quantize(x, q)[1] - x).pow(2).mean().sqrt()) for q in (*TYPES, Q.Q4_K)}
    assert rmse[Q.IQ4_NL] <= rmse[Q.IQ4_XS] < rmse[Q.Q3_K] < 0.2 * 0.02
    assert rmse[Q.Q4_K] < rmse[Q.Q3_K]


# -- the mixes ---------------------------------------------------------------------------------------------------


def test_mix_rules_by_hand():
    """llama-quant.cpp llama_tensor_get_type for the new file types, cases the tiny models below do not reach."""
    kw = dict(n_layers=32, has_output=True)
    v, down, out = (4096, 4096), (4096, 14336), (4096, 4096)
    assert [tensor_type(f"blk.{i}.attn_v.weight", v, "q3_k_m", layer=i, **kw) for i in (0, 1, 2)] == [Q.Q5_K, Q.Q5_K, Q.Q4_K]
    assert [tensor_type(f"blk.{i}.ffn_down.weight", down, "q3_k_m", layer=i, **kw) for i in (1, 2)] == [Q.Q5_K, Q.Q4_K]
    assert tensor_type("blk.3.attn_output.weight", out, "q3_k_m", layer=3, **kw) == Q.Q4_K
    assert tensor_type("blk.3.attn_output.weight", out, "q3_k_l", layer=3, **kw) == Q.Q5_K
    assert tensor_type("blk.3.attn_output.weight", out, "q3_k_s", layer=3, **kw) == Q.Q3_K
    assert tensor_type("blk.3.attn_v.weight", v, "q3_k_s", layer=3, n_layers=80, has_output=True) == Q.Q5_K  # 70B
    assert tensor_type("blk.3.attn_v.weight", v, "iq4_xs", layer=3, n_gqa=4, **kw) == Q.Q5_K
    assert tensor_type("blk.3.attn_v.weight", v, "iq4_xs", layer=3, n_gqa=2, **kw) == Q.IQ4_XS
    assert tensor_type("blk.3.ffn_down.weight", down, "iq4_xs", layer=3, **kw) == Q.Q5_K  # first eighth
    assert tensor_type("blk.3.ffn_down.weight", down, "iq4_xs", layer=3, has_imatrix=True, **kw) == Q.IQ4_XS
    assert tensor_type("blk.3.attn_output.weight", out, "iq4_xs", layer=3, n_expert=8, **kw) == Q.Q5_K
    assert tensor_type("blk.3.attn_q.weight", (4096, 640), "iq4_xs", layer=3, **kw) == Q.IQ4_NL  # 640 % 256
    assert tensor_type("blk.3.attn_q.weight", (4096, 640), "q3_k_s", layer=3, **kw) == Q.Q4_0


LLAMA_FTYPE = {"q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13, "iq4_xs": 30}  # gguf-py LlamaFileType


@pytest.fixture(scope="module")
def mix_f32(tmp_path_factory):
    # 8 layers for the per-layer rules, 4 query heads per KV head (IQ4_XS's attn_v rule), FFN 640 (fallbacks)
    c = ModelConfig(dim=256, n_layers=8, n_heads=8, n_kv_heads=2, vocab_size=256, hidden_dim=640,
                    rope_theta=500000.0, max_seq_len=1024)
    ckpt = checkpoint(c, std=0.05, seed=4)
    return ckpt, write(ckpt, tmp_path_factory.mktemp("mix") / "f32.gguf", qtype="f32")


@pytest.mark.slow  # four llama.cpp and four of our quantizations of an 8-layer model: minutes on 2 loaded cores
@pytest.mark.parametrize("ftype", list(LLAMA_FTYPE))
def test_mix_equals_llama_model_quantize(mix_f32, ftype, tmp_path):
    """llama.cpp quantizes our F32 file to the same file type: the same type for every tensor, and no more error."""
    llama_cpp = pytest.importorskip("llama_cpp")
    ckpt, f32 = mix_f32
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = LLAMA_FTYPE[ftype], 2
    ref_path = tmp_path / "llamacpp.gguf"
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(ref_path).encode(), ctypes.byref(params)) == 0
    ours_path = write(ckpt, tmp_path / "ours.gguf", qtype=ftype)
    assert {n: t for n, (t, _) in read_tensors(ours_path).items()} == {n: t for n, (t, _) in read_tensors(ref_path).items()}
    assert gguf.GGUFReader(ours_path).fields["general.file_type"].contents() == LLAMA_FTYPE[ftype]
    src, ours, ref = dequantized(f32), dequantized(ours_path), dequantized(ref_path)
    sse = [sum(float(((w[n] - x) ** 2).sum()) for n, x in src.items()) for w in (ours, ref)]
    assert sse[0] <= sse[1] * 1.001, sse


# -- (c) llama.cpp runs our files, and so does our runtime ---------------------------------------------------------


@pytest.fixture(scope="module")
def kq_f32(tmp_path_factory):
    return write(checkpoint(KQ_LLAMA3, seed=11), tmp_path_factory.mktemp("run") / "f32.gguf", qtype="f32")


@pytest.mark.parametrize("ftype", ["q3_k_m", "iq4_xs", pytest.param("q3_k_s", marks=pytest.mark.slow)])
def test_llama_cpp_and_our_runtime_run_our_file(kq_f32, tmp_path, ftype):
    """llama.cpp loads the file we write and its logits match our model on the same (gguf-py decoded) weights;
    so does our runtime (reader + packed linears: Q3_K/IQ4_XS/IQ4_NL have no native kernel and take the generic
    decoding path; the mix's Q4_K/Q5_K/Q6_K take the native kernels, which round activations to 8 bits as
    llama.cpp does, hence the llama.cpp tolerance there)."""
    pytest.importorskip("llama_cpp")
    from tests.test_llamacpp_interop import _float_model_logits, _llama_cpp_logits

    path = write(llamaherd.checkpoint.read(kq_f32), tmp_path / f"{ftype}.gguf", qtype=ftype)
    types = {t.name for t, _ in read_tensors(path).values()}
    assert ({"Q3_K"} if ftype.startswith("q3") else {"IQ4_XS", "IQ4_NL"}) <= types
    ids = [1, 17, 42, 99, 3, 250, 7, 64, 128, 5, 11, 200]
    theirs, ours = _llama_cpp_logits(path, ids), _float_model_logits(path, KQ_LLAMA3, ids)
    with llamaherd.native.disabled():
        reference_path = llamaherd.load(path).logits(ids).numpy()
    np.testing.assert_allclose(reference_path, ours, rtol=0, atol=1e-4)  # our decoders: float noise only
    runtime = llamaherd.load(path).logits(ids).numpy()
    for got in (ours, runtime):
        # llama.cpp quantizes activations to 8 bits before each quantized dot product (test_llamacpp_interop.py)
        assert np.abs(got - theirs).max() < 0.15 and np.abs(got - theirs).mean() < 0.02
        assert (got.argmax(-1) == theirs.argmax(-1)).mean() >= 0.9


# -- herd quantize --type int8|int4[-gN] ---------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["int8", "int4-g32"])
def test_herd_quantize_writes_the_weight_only_folder(tiny_folder, tmp_path, capsys, scheme):
    from llamaherd.cli import main

    out = tmp_path / "q"
    assert main(["quantize", str(tiny_folder), str(out), "--type", scheme, "--quiet"]) == 0
    assert scheme in capsys.readouterr().out
    ids = [128000, 791, 4062, 14198, 39935]
    back = llamaherd.load(out)  # the saved codes, read without quantizing again
    want = llamaherd.load(tiny_folder, quantize=scheme)
    assert torch.equal(back.logits(ids), want.logits(ids))
    assert not torch.equal(back.logits(ids), llamaherd.load(tiny_folder).logits(ids))
    assert main(["quantize", str(tiny_folder), str(out), "--type", scheme]) == 1  # exists: refused, kept
    assert "already exists" in capsys.readouterr().err
    assert main(["quantize", str(tiny_folder), str(tmp_path / "r"), "--type", scheme, "--imatrix", "x.dat"]) == 1
    assert "importance matrix" in capsys.readouterr().err
