"""Native ggml CPU kernels: decoding bit-identical to gguf-py's reference, products equal to decode-then-matmul."""

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llamaherd.quant.ggml_quants import dequantize, ggml_type
from llamaherd import native
from llamaherd.native import ggml_kernels
from llamaherd.quant import GGMLWeight

pytestmark = pytest.mark.skipif(ggml_kernels.library() is None, reason="no C compiler: native kernels not built")


@pytest.fixture(autouse=True)
def float_activations(monkeypatch):
    # These compare the float-activation kernels (native/ggml.c) with float64 math at float32 tolerances; the
    # default int8-activation path (ggml_kernels.INT8_ACTIVATIONS) rounds x to int8 codes first and is tested
    # against float64 math on the quantized x in tests/test_q8_kernels.py.
    monkeypatch.setattr(ggml_kernels, "INT8_ACTIVATIONS", False)

# Byte offsets of each type's float16 scale fields (ggml-common.h block layouts).
F16_AT = {"Q4_0": (0,), "Q5_0": (0,), "Q8_0": (0,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(name: str, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Random packed rows: every quant bit pattern is valid; float16 scales are set to finite values."""
    t = ggml_type(name)
    g = torch.Generator().manual_seed(seed)
    nb = rows * cols // t.block_size
    b = torch.randint(0, 256, (nb, t.type_size), dtype=torch.uint8, generator=g)
    for at in F16_AT[name]:
        scale = (torch.rand(nb, 1, generator=g) * 0.02 - 0.01).half()  # both signs, like real mins
        b[:, at : at + 2] = scale.view(torch.uint8)
    return b.reshape(rows, cols // t.block_size * t.type_size)


@pytest.mark.parametrize("name", sorted(F16_AT))
def test_dequantize_bit_identical_to_gguf_py(name):
    t = ggml_type(name)
    packed = random_blocks(name, 96, 512)
    want = gguf.quants.dequantize(packed.numpy(), gguf.GGMLQuantizationType[name])
    got = ggml_kernels.dequantize(packed, t.id, 512)
    assert torch.equal(got, torch.from_numpy(np.ascontiguousarray(want)))
    assert torch.equal(got, dequantize(packed, t))


@pytest.mark.parametrize("name", sorted(F16_AT))
@pytest.mark.parametrize("m", [1, 3, 64])
def test_gemv_equals_decode_then_matmul(name, m):
    t = ggml_type(name)
    packed = random_blocks(name, 200, 768, seed=1)
    dense = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(packed.numpy(), gguf.GGMLQuantizationType[name])))
    x = torch.randn(m, 768, generator=torch.Generator().manual_seed(2))
    want = x.double() @ dense.double().T
    got = ggml_kernels.gemv(x, packed, t.id, 768)
    # float32 accumulation over 768 terms vs a float64 reference: relative to the row's magnitude
    torch.testing.assert_close(got.double(), want, atol=2e-6 * want.abs().max().item(), rtol=0)


@pytest.mark.parametrize("name", sorted(F16_AT))
def test_dequantize_to_bf16_rounds_like_torch(name):
    t = ggml_type(name)
    packed = random_blocks(name, 64, 512, seed=5)
    got = ggml_kernels.dequantize(packed, t.id, 512, torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got.view(torch.int16), dequantize(packed, t).bfloat16().view(torch.int16))


@pytest.mark.parametrize("chunked", [False, True])
def test_bf16_prefill_products(monkeypatch, chunked):
    # Many rows with BF16_PREFILL: bf16 operands (x rounded, weights decoded and rounded) and a bf16 GEMM that
    # accumulates in float32, then rounds each output to bf16: the float64 product of the rounded operands
    # within bf16's half-ulp (2^-9 relative) plus float32 summation error.
    monkeypatch.setattr(ggml_kernels, "BF16_PREFILL", True)
    if chunked:
        monkeypatch.setattr(ggml_kernels, "_CHUNK_ELEMENTS", 1024 * 7)  # 7 weight rows per chunk, a ragged last one
    t = ggml_type("Q6_K")
    packed = random_blocks("Q6_K", 50, 1024, seed=6)
    x = torch.randn(100, 1024, generator=torch.Generator().manual_seed(7))
    want = x.bfloat16().double() @ dequantize(packed, t).bfloat16().double().T
    got = ggml_kernels.linear(x, packed, t.id, 1024)
    assert got.dtype == torch.float32 and got.shape == (100, 50)
    torch.testing.assert_close(got.double(), want, atol=1e-5 * want.abs().max().item(), rtol=2**-8)
    # and it is not the float32 product: the switch does change the arithmetic
    monkeypatch.setattr(ggml_kernels, "BF16_PREFILL", False)
    assert not torch.equal(ggml_kernels.linear(x, packed, t.id, 1024), got)


def test_row_count_routing(monkeypatch):
    # With bf16 GEMMs a product of more than BF16_GEMM_MIN_ROWS - 1 rows is decoded and multiplied in bf16
    # (measured crossover); without them the matrix-vector kernels take up to MAX_GEMV_ROWS rows.
    monkeypatch.setattr(ggml_kernels, "BF16_PREFILL", True)
    assert ggml_kernels.use_gemv(ggml_kernels.BF16_GEMM_MIN_ROWS - 1)
    assert not ggml_kernels.use_gemv(ggml_kernels.BF16_GEMM_MIN_ROWS)
    t = ggml_type("Q8_0")
    packed = random_blocks("Q8_0", 40, 256, seed=8)
    x = torch.randn(ggml_kernels.BF16_GEMM_MIN_ROWS, 256, generator=torch.Generator().manual_seed(9))
    want = x.bfloat16().float() @ dequantize(packed, t).bfloat16().float().T
    torch.testing.assert_close(ggml_kernels.linear(x, packed, t.id, 256), want, atol=1e-2, rtol=2**-8)
    monkeypatch.setattr(ggml_kernels, "BF16_PREFILL", False)
    assert ggml_kernels.use_gemv(ggml_kernels.MAX_GEMV_ROWS) and not ggml_kernels.use_gemv(ggml_kernels.MAX_GEMV_ROWS + 1)


def test_dequantize_into_buffer_checks_it():
    t = ggml_type("Q4_0")
    packed = random_blocks("Q4_0", 4, 64, seed=10)
    buf = torch.empty(4 * 64, dtype=torch.bfloat16)
    got = ggml_kernels.dequantize(packed, t.id, 64, torch.bfloat16, out=buf)
    assert got.shape == (4, 64) and got.data_ptr() == buf.data_ptr()
    with pytest.raises(ValueError, match="contiguous"):
        ggml_kernels.dequantize(packed, t.id, 64, torch.bfloat16, out=torch.empty(3, dtype=torch.bfloat16))


def test_linear_many_rows_and_strided_rows(monkeypatch):
    # 100 rows takes the decode + GEMM path; a row slice of a bigger matrix has a row stride > row bytes.
    monkeypatch.setattr(ggml_kernels, "BF16_PREFILL", False)  # float32 products, compared in float32
    t = ggml_type("Q4_K")
    packed = random_blocks("Q4_K", 50, 1024, seed=3)
    dense = dequantize(packed, t)
    x = torch.randn(100, 1024)
    torch.testing.assert_close(ggml_kernels.linear(x, packed, t.id, 1024), x @ dense.T, atol=1e-4, rtol=1e-5)
    wide = torch.cat([packed, packed], dim=1)[:, : packed.shape[1]]  # same bytes, stride 2x row bytes
    assert wide.stride(0) == 2 * packed.shape[1]
    torch.testing.assert_close(ggml_kernels.gemv(x[:2], wide, t.id, 1024), x[:2] @ dense.T, atol=1e-4, rtol=1e-5)


def test_packed_weight_linear_uses_native_path_and_off_switch(monkeypatch):
    packed = random_blocks("Q8_0", 40, 256, seed=4)
    w = GGMLWeight(packed, "Q8_0")
    x = torch.randn(2, 3, 256)
    fast = F.linear(x, w)
    monkeypatch.setattr(native, "ENABLED", False)
    assert not ggml_kernels.available(8)
    fallback = F.linear(x, w)
    torch.testing.assert_close(fast, fallback, atol=1e-5, rtol=1e-5)
    assert fast.shape == (2, 3, 40)
