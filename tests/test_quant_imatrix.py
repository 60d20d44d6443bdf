"""Importance matrices: collection, llama.cpp's two file layouts, and the weighted k-quant searches against
llama.cpp's own quantizers (ggml_quantize_chunk with quant_weights, from llama-cpp-python's libggml)."""

from __future__ import annotations

import ctypes
import glob
import math
import os
import struct

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import llamaherd
from llamaherd.checkpoint.gguf_write import write
from llamaherd.cli.imatrix import collector_for, without_logits
from llamaherd.quant import imatrix
from llamaherd.quant.quantize import WEIGHTED, quantize
from tests.gguf_write_fixtures import KQ_LLAMA3, checkpoint
from tests.test_cli_chat import tiny_folder  # noqa: F401  (a fixture: a Llama 3 folder with its tokenizer)

# -- the quantizers against llama.cpp ------------------------------------------------------------------------------


def _libggml():
    llama_cpp = pytest.importorskip("llama_cpp")
    found = glob.glob(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    if not found:
        pytest.skip("llama-cpp-python ships no libggml-base.so")
    lib = ctypes.CDLL(found[0])
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def llama_cpp_quantize(lib, x: np.ndarray, qtype: Q, importance: np.ndarray | None) -> np.ndarray:
    """llama.cpp's row quantizer (ggml.c ggml_quantize_chunk -> quantize_q4_K etc.), as llama-quantize calls it."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = x.shape
    elems, size = gguf.GGML_QUANT_SIZES[qtype]
    out = np.zeros((rows, n // elems * size), np.uint8)
    w = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
    lib.ggml_quantize_init(int(qtype))
    lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, n,
                            None if w is None else w.ctypes.data)
    return out


def _weights_and_importance(seed=0, rows=32, n=512):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g) * 0.05
    x[3, 7] = 0.9  # an outlier column entry
    importance = torch.rand(n, generator=g) ** 4 * 10 + 1e-3  # a few columns matter far more than the rest
    return x, importance


@pytest.mark.parametrize("qtype", WEIGHTED, ids=lambda q: q.name)
def test_weighted_quantizers_match_llama_cpp(qtype):
    """Same blocks as llama.cpp's quantizer given the same importance weights, up to float rounding order: the
    importance-weighted error agrees to 0.5% (the fp16 scales differ by one unit where float sums round apart)
    and most blocks are byte-identical; gguf-py decodes our bytes to
    exactly our reconstruction."""
    lib = _libggml()
    x, imp = _weights_and_importance()
    raw, recon = quantize(x, qtype, imp)
    np.testing.assert_array_equal(gguf.quants.dequantize(raw, qtype), recon.numpy())
    theirs = llama_cpp_quantize(lib, x.numpy(), qtype, imp.numpy())
    ref = torch.from_numpy(gguf.quants.dequantize(theirs, qtype))
    err_ours, err_ref = float(((recon - x) ** 2 * imp).sum()), float(((ref - x) ** 2 * imp).sum())
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    same = float((raw.reshape(-1, size) == theirs.reshape(-1, size)).all(1).mean())
    assert abs(err_ours - err_ref) <= 5e-3 * err_ref, (err_ours, err_ref)
    assert same >= 0.7, f"only {same:.0%} of the blocks equal llama.cpp's"


@pytest.mark.parametrize("qtype", WEIGHTED, ids=lambda q: q.name)
def test_importance_lowers_the_weighted_error(qtype):
    """The point of it: the error the importance weights measure is lower when the search is given them."""
    x, imp = _weights_and_importance(seed=1)
    _, plain = quantize(x, qtype)
    _, weighted = quantize(x, qtype, imp)
    assert float(((weighted - x) ** 2 * imp).sum()) < float(((plain - x) ** 2 * imp).sum())


def test_expert_stacks_take_one_importance_row_per_expert():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 8, 256, generator=g) * 0.05
    imp = torch.rand(3, 256, generator=g) + 0.01
    raw, _ = quantize(x, Q.Q4_K, imp)
    for e in range(3):
        np.testing.assert_array_equal(raw[e], quantize(x[e], Q.Q4_K, imp[e])[0])
    assert (raw[1] != quantize(x[1], Q.Q4_K, imp[0])[0]).any()
    with pytest.raises(ValueError, match="importance"):
        quantize(x, Q.Q4_K, torch.ones(2, 256))


# -- the files -----------------------------------------------------------------------------------------------------


def _stats():
    im = imatrix.IMatrix(chunk_size=64, chunks=3, datasets=["calibration.txt"])
    g = torch.Generator().manual_seed(3)
    for name, n in (("blk.0.attn_q.weight", 32), ("blk.0.ffn_down.weight", 48)):
        im.add(name, torch.randn(150, n, generator=g))
    for e in (0, 2):  # an expert stack where expert 1 saw no token
        im.add("blk.0.ffn_gate_exps.weight", torch.randn(20 + e, 32, generator=g), mat=e, n_mat=3)
    return im


def independent_dat(entries: list[tuple[str, int, np.ndarray]], chunks: int, dataset: str) -> bytes:
    """imatrix.cpp save_imatrix_legacy's layout, written here from its published description."""
    out = struct.pack("<i", len(entries))
    for name, ncall, values in entries:
        out += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, values.size)
        out += values.astype("<f4").tobytes()
    return out + struct.pack("<i", chunks) + struct.pack("<i", len(dataset)) + dataset.encode()


def test_dat_file_is_llama_cpp_legacy_layout(tmp_path):
    im = _stats()
    path = imatrix.write_dat(im, tmp_path / "imatrix.dat")
    entries = []
    for name in sorted(im.entries):
        e = im.entries[name]
        ncall = math.ceil(float(e.counts.max()) / 64)
        vals = np.concatenate([(e.sums[m] / e.counts[m]).numpy() * ncall if e.counts[m] > 0
                               else np.full(e.sums.shape[1], ncall) for m in range(e.sums.shape[0])])
        entries.append((name, ncall, vals))
    assert path.read_bytes() == independent_dat(entries, 3, "calibration.txt")


def test_reading_an_independently_written_dat(tmp_path):
    vals = np.array([4.0, 0.5, 9.0, 1.0], np.float32)
    (tmp_path / "x.dat").write_bytes(independent_dat([("blk.3.ffn_up.weight", 2, vals)], 7, "wiki.train.raw"))
    im = imatrix.read(tmp_path / "x.dat")
    assert im.chunks == 7 and im.datasets == ["wiki.train.raw"]
    # llama-quantize's load_imatrix: the stored values divided by ncall are the weights it uses
    torch.testing.assert_close(im.weights("blk.3.ffn_up.weight", 1, 4), torch.from_numpy(vals / 2)[None])
    assert im.weights("blk.9.ffn_up.weight", 1, 4) is None
    with pytest.raises(imatrix.IMatrixError, match="another model"):
        im.weights("blk.3.ffn_up.weight", 1, 8)


def test_expert_entries_survive_the_dat_round_trip(tmp_path):
    """The legacy layout stores an expert stack's rows back to back with one count (imatrix.cpp); llama-quantize
    takes n_expert * n_per_row values for it."""
    im = _stats()
    back = imatrix.read(imatrix.write_dat(im, tmp_path / "imatrix.dat"), chunk_size=64)
    e = im.entries["blk.0.ffn_gate_exps.weight"]
    w = back.weights("blk.0.ffn_gate_exps.weight", 3, 32)
    torch.testing.assert_close(w[0], (e.sums[0] / 20).float())
    torch.testing.assert_close(w[1], torch.ones(32))  # no token reached expert 1: stored as 1
    torch.testing.assert_close(w[2], (e.sums[2] / 22).float())


def test_gguf_file_read_by_gguf_py(tmp_path):
    im = _stats()
    path = imatrix.write_gguf(im, tmp_path / "imatrix.gguf")
    r = gguf.GGUFReader(path)
    assert r.fields["general.type"].contents() == "imatrix"
    assert r.fields["imatrix.chunk_size"].contents() == 64 and r.fields["imatrix.chunk_count"].contents() == 3
    assert r.fields["imatrix.datasets"].contents() == ["calibration.txt"]
    tensors = {t.name: np.array(t.data) for t in r.tensors}
    e = im.entries["blk.0.ffn_gate_exps.weight"]
    np.testing.assert_array_equal(tensors["blk.0.ffn_gate_exps.weight.in_sum2"], e.sums.float().numpy())
    np.testing.assert_array_equal(tensors["blk.0.ffn_gate_exps.weight.counts"].reshape(-1), [20, 0, 22])
    back = imatrix.read(path)
    for name, entry in im.entries.items():
        torch.testing.assert_close(back.weights(name, entry.sums.shape[0], entry.sums.shape[1]), entry.mean())


@pytest.mark.parametrize("data", [b"", b"\x01\x00\x00\x00\xff\xff\x00\x00", struct.pack("<i", 1) + struct.pack("<i", 3)
                                  + b"abc" + struct.pack("<ii", 1, 1000) + b"\0" * 8])
def test_broken_files_are_typed_errors(tmp_path, data):
    (tmp_path / "bad.dat").write_bytes(data)
    with pytest.raises(imatrix.IMatrixError):
        imatrix.read(tmp_path / "bad.dat")


# -- collecting, and the files llama.cpp runs ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def f32_file(tmp_path_factory):
    return write(checkpoint(KQ_LLAMA3, seed=4), tmp_path_factory.mktemp("im") / "f32.gguf", qtype="f32")


def test_collected_sums_are_the_squared_inputs(f32_file):
    with llamaherd.native.disabled():
        model = llamaherd.load(f32_file)
    im = imatrix.IMatrix(chunk_size=32)
    collector = collector_for(model, im)
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        without_logits(model.net)(tokens)
    collector.close()
    assert len(im.entries) == KQ_LLAMA3.n_layers * 7
    with torch.inference_mode():  # layer 0's query projection sees the first norm of the embeddings
        h = model.net.layers[0].attention_norm(model.net.tok_embeddings(tokens)).double()
    e = im.entries["blk.0.attn_q.weight"]
    torch.testing.assert_close(e.sums[0], (h * h).sum((0, 1)), rtol=1e-5, atol=1e-6)
    assert e.counts.tolist() == [64.0]
    assert im.entries["blk.1.ffn_down.weight"].sums.shape == (1, KQ_LLAMA3.hidden_dim)


def test_expert_inputs_are_counted_per_expert():
    from llamaherd.model.moe import Experts

    experts = Experts(4, 16, 24)
    for p in experts.parameters():
        torch.nn.init.normal_(p)
    im = imatrix.IMatrix()
    collector = imatrix.Collector(im, {}, {experts: ("g", "u", "d")})
    x = torch.randn(5, 16)
    experts(x, 2)
    collector.close()
    assert im.entries["g"].counts.tolist() == [0, 0, 5, 0]
    torch.testing.assert_close(im.entries["u"].sums[2], (x.double() ** 2).sum(0))
    h = torch.nn.functional.silu(x @ experts.moe_w_in_eD_F[2]) * (x @ experts.moe_w_swiglu_eD_F[2])
    torch.testing.assert_close(im.entries["d"].sums[2], (h.double() ** 2).sum(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ftype", ["q4_k_m", "q4_0"])
def test_llama_cpp_runs_our_imatrix_quantized_file(f32_file, tmp_path, ftype):
    """imatrix collected, saved, read back, used: llama.cpp loads the file and its logits match our decode of it."""
    pytest.importorskip("llama_cpp")
    with llamaherd.native.disabled():
        model = llamaherd.load(f32_file)
    im = imatrix.IMatrix(chunk_size=64, chunks=2)
    collector = collector_for(model, im)
    with torch.inference_mode():
        without_logits(model.net)(torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(6)))
    collector.close()
    im = imatrix.read(imatrix.write_dat(im, tmp_path / "imatrix.dat"))
    path = write(llamaherd.checkpoint.read(f32_file), tmp_path / "q.gguf", qtype=ftype, imatrix=im)
    plain = write(llamaherd.checkpoint.read(f32_file), tmp_path / "plain.gguf", qtype=ftype)
    assert path.read_bytes() != plain.read_bytes()
    assert gguf.GGUFReader(path).fields["quantize.imatrix.entries_count"].contents() == len(im.entries)
    ids = [1, 17, 42, 99, 3, 250, 7, 64, 128, 5, 11, 200]
    from tests.test_llamacpp_interop import _float_model_logits, _llama_cpp_logits

    theirs, ours = _llama_cpp_logits(path, ids), _float_model_logits(path, KQ_LLAMA3, ids)
    # llama.cpp quantizes activations to 8 bits before each quantized dot product (test_llamacpp_interop.py)
    assert np.abs(ours - theirs).max() < 0.15 and np.abs(ours - theirs).mean() < 0.02


def test_herd_imatrix_then_quantize(tiny_folder, tmp_path, capsys):
    """The two verbs end to end on a Llama 3 folder: the file written is read back by llama.cpp's rules and used."""
    from llamaherd.cli import main

    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "imatrix.dat"
    assert main(["imatrix", str(tiny_folder), "-f", str(text), "-o", str(out), "-c", "32", "--quiet"]) == 0
    im = imatrix.read(out)
    assert len(im.entries) == 7 and im.chunks >= 2 and im.datasets == [str(text)]
    dst = tmp_path / "q.gguf"
    assert main(["quantize", str(tiny_folder), str(dst), "--type", "q4_0", "--imatrix", str(out), "--quiet"]) == 0
    fields = gguf.GGUFReader(dst).fields
    assert fields["quantize.imatrix.entries_count"].contents() == 7
    assert fields["quantize.imatrix.dataset"].contents() == str(text)
    (tmp_path / "bad.dat").write_bytes(b"\0\0\0\0")
    assert main(["quantize", str(tiny_folder), str(tmp_path / "x.gguf"), "--imatrix", str(tmp_path / "bad.dat")]) == 1
    assert "no entries" in capsys.readouterr().err
