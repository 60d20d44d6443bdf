"""Dequantization of every supported ggml type equals gguf-py's reference decoder bit for bit."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT

from llamaherd.quant import ggml_quants as gq
from llamaherd import gguf_file
from llamaherd.checkpoint import gguf as reader
from llamaherd import native
from llamaherd.native import ggml_kernels
from llamaherd.quant import GGMLWeight, ggml as qmod
from tests.gguf_read_fixtures import gemma_gguf


def same_bits(ours: torch.Tensor, ref: np.ndarray) -> bool:
    a = ours.numpy()
    return a.shape == ref.shape and np.array_equal(a.view(np.uint32), ref.astype(np.float32).view(np.uint32))


@pytest.fixture(scope="module")
def gemma_path(tmp_path_factory):
    return gemma_gguf(tmp_path_factory.mktemp("gemma"))


def test_real_gemma_tensors_decode_like_gguf_py(gemma_path):
    """Every quantized type in the Gemma 3 270M Q4_K_M file (Q4_K, Q6_K, Q5_0, Q8_0), first tensor of each.

    Tensor bytes are located by our header parser (gguf-py's reader takes ~40 s on this vocabulary; the
    parser is checked against it in test_gguf_fuzz.py); the decoding reference is gguf-py's.
    """
    header, mm = gguf_file.open_gguf(gemma_path)
    seen = {}
    for info in header.tensors.values():
        if info.type.name in seen or not info.type.quantized:
            continue
        seen[info.type.name] = info.name
        rows = info.shape[0] if len(info.shape) > 1 else 1
        raw = np.frombuffer(mm, np.uint8, info.nbytes, info.offset).reshape(rows, -1)[:4096].copy()
        ours = gq.dequantize(torch.from_numpy(raw.copy()), info.type)
        assert same_bits(ours, gguf.quants.dequantize(raw, QT(info.type.id))), info.name
    assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0"} <= set(seen)


@pytest.mark.parametrize("qtype", [QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0])
def test_gguf_py_quantized_values_decode_identically(qtype):
    rng = np.random.default_rng(int(qtype))
    x = (rng.standard_normal((48, 256)) * rng.uniform(0.01, 3, (48, 1))).astype(np.float32)
    x[3] = 0.0  # an all-zero block row (scale 0)
    packed = gguf.quants.quantize(x, qtype)
    ref = gguf.quants.dequantize(packed, qtype)
    ours = gq.dequantize(torch.from_numpy(np.ascontiguousarray(packed).view(np.uint8)), int(qtype))
    assert same_bits(ours, ref)


# Byte offsets of the float16 scale fields per block (ggml-common.h block_* structs): filled with finite
# values so that random bytes elsewhere form valid blocks.
F16_FIELDS = {QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,),
              QT.IQ4_NL: (0,), QT.IQ4_XS: (0,), QT.Q4_0: (0,), QT.Q4_1: (0, 2), QT.Q5_0: (0,), QT.Q5_1: (0, 2),
              QT.Q8_0: (0,)}


@pytest.mark.parametrize("qtype", sorted(F16_FIELDS, key=int))
def test_random_valid_blocks_decode_like_gguf_py(qtype):
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(100 + int(qtype))
    raw = rng.integers(0, 256, (64, 4 * size), dtype=np.uint8)
    blocks = raw.reshape(-1, size)
    for at in F16_FIELDS[qtype]:
        blocks[:, at : at + 2] = rng.uniform(-2, 2, (blocks.shape[0], 1)).astype(np.float16).view(np.uint8)
    ref = gguf.quants.dequantize(raw, qtype)
    ours = gq.dequantize(torch.from_numpy(raw.copy()), int(qtype))
    assert ref.shape == (64, 4 * block)
    assert same_bits(ours, ref)


def test_every_supported_type_matches_gguf_py_sizes():
    for t in gguf_file.TYPES.values():
        assert gguf.GGML_QUANT_SIZES[QT(t.id)] == (t.block_size, t.type_size), t.name
        assert QT(t.id).name == t.name


def test_packed_linear_and_embedding_equal_float_ops(monkeypatch):
    rng = np.random.default_rng(7)
    w = rng.standard_normal((300, 64)).astype(np.float32)
    packed = gguf.quants.quantize(w, QT.Q8_0)
    dense = torch.from_numpy(gguf.quants.dequantize(packed, QT.Q8_0))
    pw = GGMLWeight(torch.from_numpy(packed.copy()), "Q8_0")
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    want = F.linear(x, dense)
    # Float math at float32 tolerance: the float-activation kernels, not the default int8 activations
    # (llama.cpp's rounding of x, tested in tests/test_q8_kernels.py).
    monkeypatch.setattr(ggml_kernels, "INT8_ACTIVATIONS", False)
    # The native kernels (native/ggml_kernels.py) sum in another order than torch's GEMM: a few float32 ulps.
    torch.testing.assert_close(F.linear(x, pw), want, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(native, "ENABLED", False)  # the pure-torch path below
    torch.testing.assert_close(F.linear(x, pw), want, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(qmod, "CHUNK_ELEMENTS", 64 * 7)  # 7 rows per chunk: exercises the chunked path
    # Only the matmul's blocking differs between chunk shapes: float32 rounding, not decoding.
    torch.testing.assert_close(F.linear(x, pw), want, atol=1e-5, rtol=1e-5)
    ids = torch.tensor([[0, 299, 5], [5, 5, 17]])
    assert torch.equal(F.embedding(ids, pw), F.embedding(ids, dense))
    # Byte-preserving ops keep the packed meaning; the row slice decodes to the same rows.
    assert isinstance(pw[10:20], GGMLWeight) and torch.equal(pw[10:20].dequantize(), dense[10:20])
    # Conversions to float give the values (as writers converting a read checkpoint expect), not the bytes.
    assert torch.equal(pw.float(), dense) and torch.equal(pw.to(torch.float32), dense)
    assert pw.to(dtype=torch.bfloat16).dtype == torch.bfloat16 and pw.to("cpu").dtype == torch.uint8


def test_gemma_file_stays_packed_after_reading(gemma_path):
    ck = reader.read(gemma_path)
    assert ck.metadata["file_type"] == "Q4_K_M" and ck.metadata["format"] == "gguf"
    q = ck.metadata["quantized"]
    assert q["tok_embeddings.weight"] == "Q8_0" and q["layers.0.feed_forward.w2.weight"] == "Q6_K"
    emb = ck.state_dict["tok_embeddings.weight"]
    assert isinstance(emb, GGMLWeight) and emb.shape == (262144, 680) and emb.n_cols == 640
