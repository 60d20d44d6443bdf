"""Int8-activation kernels (native/ggml_q8.c): llama.cpp's activation codes, products equal to float64 math.

Activations are quantized to Q8_0 blocks of 32 (byte-exact with gguf-py's `quantize(x, Q8_0)`) for every
weight type: llama.cpp's own choice for Q4_0/Q5_0/Q8_0 weights; for the K-quants llama.cpp takes Q8_K blocks
of 256 (one scale per 256, transcribed from its `quantize_row_q8_K_ref` in q8_k_reference; gguf-py has no
Q8_K), which the product test below shows several times less accurate. The reference for a product is gguf-py's decode
of the packed weight times the DEQUANTIZED int8 activations (codes x block scale), in float64: the kernels
compute exactly that, with exact integer dots per block and float32 scaling and accumulation, so the only
difference is float32 rounding.
"""

import ctypes
import os
import shutil
import subprocess

import gguf
import numpy as np
import pytest
import torch

from llamaherd import native
from llamaherd.quant.ggml_quants import ggml_type
from llamaherd.native import ggml_kernels
from tests.test_cpu_kernels import random_blocks

pytestmark = pytest.mark.skipif(ggml_kernels.library() is None, reason="no C compiler: native kernels not built")

TYPES = ["Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
Q8_0 = gguf.GGMLQuantizationType.Q8_0


def activations(m: int, k: int, seed: int = 0) -> torch.Tensor:
    """Rows whose magnitudes span 1e-4..1e2 along K, one all-zero block of 32 and one outlier per row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-4, 2, k)[torch.randperm(k, generator=g)]
    x[:, 32:64] = 0.0  # d = 0: codes 0, scale 0
    x[:, k - 7] = 1e4  # one huge value: its block's other codes round to 0
    return x


def quantize(x: torch.Tensor, name: str, lib=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernels' activations for weights of type `name`: codes (M, K) int8, scale per 32 (M, K/32), per-16
    code sums (M, K/16)."""
    M, K = x.shape
    q, d, s16 = torch.empty(M, K, dtype=torch.int8), torch.empty(M, K // 32), torch.empty(M, K // 16)
    fn = ggml_kernels._fn("lh_q8_quantize") if lib is None else lib.lh_q8_quantize
    assert fn(ggml_type(name).id, x.data_ptr(), M, K, q.data_ptr(), d.data_ptr(), s16.data_ptr()) == 0
    return q, d, s16


def q8_k_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp `quantize_row_q8_K_ref` (ggml-quants.c) in numpy float32: codes (..., K) and d (..., K/256)."""
    b = x.astype(np.float32).reshape(-1, 256)
    first_max = b[np.arange(len(b)), np.abs(b).argmax(axis=1)]  # argmax: the first of equal magnitudes
    with np.errstate(divide="ignore"):
        iscale = np.where(first_max == 0, np.float32(0), np.float32(-127.0) / first_max).astype(np.float32)
    q = np.minimum(np.rint(iscale[:, None] * b), 127).astype(np.int8)  # nearest_int: half to even
    with np.errstate(divide="ignore"):
        d = np.where(iscale == 0, np.float32(0), np.float32(1.0) / iscale).astype(np.float32)
    return q.reshape(x.shape), d.reshape(*x.shape[:-1], -1)


def dequantized(x: torch.Tensor, name: str) -> torch.Tensor:
    q, d, _ = quantize(x, name)
    M, K = x.shape
    return (q.double().view(M, K // 32, 32) * d.double()[..., None]).view(M, K)


def dense(packed: torch.Tensor, name: str) -> torch.Tensor:
    w = gguf.quants.dequantize(packed.numpy(), gguf.GGMLQuantizationType[name])
    return torch.from_numpy(np.ascontiguousarray(w)).double()


def assert_product(got: torch.Tensor, packed: torch.Tensor, name: str, x: torch.Tensor) -> None:
    # Per block the integer dot is exact; scale (1-2 float32 products) and scaled dot round at 2^-24 each, and
    # float32 accumulation over K/64 vectors (plus the separately summed offset terms, at most ~2x sum|w||x|)
    # adds ~K/64 * 2^-24 relative each: for K = 768, < 3e-6 of sum|w||x| in the worst case. 1e-5 leaves room
    # and still fails on any wrong code, scale or offset (one code step of one weight is ~1e-3 of the sum).
    w, xd = dense(packed, name), dequantized(x, name)
    want, scale = xd @ w.T, xd.abs() @ w.abs().T
    err = (got.double() - want).abs() / scale.clamp_min(1e-30)
    assert err.max().item() < 1e-5, f"{name}: max relative error {err.max().item():.2e}"


@pytest.mark.parametrize("name", ["Q4_0", "Q5_0", "Q8_0"])
def test_q8_0_activations_byte_exact_with_gguf_py(name):
    x = activations(3, 1024)
    x[0, 128:160] = torch.tensor([127.0, 2.5, -2.5, 0.5, -0.5, 1.5, -1.5, 126.5] * 4)  # d = 1: ties round away from 0
    q, d, s16 = quantize(x, name)
    ref = gguf.quants.quantize(x.numpy(), Q8_0).reshape(3, 32, 34)
    assert np.array_equal(q.numpy(), ref[..., 2:].view(np.int8).reshape(3, 1024))
    # the products use the float16 scale field itself, as llama.cpp's vec_dot_q*_0_q8_0 do
    assert np.array_equal(d.numpy(), ref[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))
    assert q[0, 128:136].tolist() == [127, 3, -3, 1, -1, 2, -2, 127]
    assert torch.equal(s16, q.view(3, 64, 16).sum(-1).float())
    assert (d[:, 1] == 0).all() and (q[:, 32:64] == 0).all()


@pytest.mark.parametrize("name", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_activations_are_q8_0_blocks(name):
    # The K-quants multiply the same Q8_0 blocks of 32 (not llama.cpp's Q8_K, one scale per 256): codes and
    # scales byte-exact with gguf-py's quantize(x, Q8_0), per-32 scales repeated for each half of 16
    x = activations(3, 1024)
    x[0, :256] = 0.0  # an all-zero super-block
    q, d, s16 = quantize(x, name)
    ref = gguf.quants.quantize(x.numpy(), Q8_0).reshape(3, 32, 34)
    assert np.array_equal(q.numpy(), ref[..., 2:].view(np.int8).reshape(3, 1024))
    assert np.array_equal(d.numpy(), ref[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))
    assert torch.equal(s16, q.view(3, 64, 16).sum(-1).float())
    assert (q[0, :256] == 0).all() and (d[0, :8] == 0).all()


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K"])
def test_k_quant_products_closer_to_float_than_with_llama_cpp_q8_k(name):
    """Why the K-quants take blocks of 32: with activations whose scale changes along the row (as after a gated
    feed-forward), one int8 scale per 256 (llama.cpp's Q8_K, `quantize_row_q8_K_ref`, transcribed in
    q8_k_reference) rounds the small elements of a super-block away. Against the product with unquantized
    activations, ours is about 2.5 times closer in total, and closer for most outputs."""
    K, N = 2048, 96
    g = torch.Generator().manual_seed(6)
    block_scale = 10.0 ** (3 * torch.rand(8, K // 32, generator=g) - 2)  # 0.01..10, per block of 32
    packed, x = random_blocks(name, N, K, seed=5), torch.randn(8, K, generator=g) * block_scale.repeat_interleave(32, 1)
    w = dense(packed, name)
    exact = x.double() @ w.T
    ours = ggml_kernels.gemv(x, packed, ggml_type(name).id, K).double()
    q, d = q8_k_reference(x.numpy())
    theirs = (torch.from_numpy(q).double().view(8, K // 256, 256) * torch.from_numpy(d).double()[..., None]).view(8, K) @ w.T
    err_ours, err_theirs = (ours - exact).abs(), (theirs - exact).abs()
    assert err_ours.sum() < 0.6 * err_theirs.sum()  # measured 0.40 (Q4_K), 0.43 (Q6_K)
    assert (err_ours < err_theirs).float().mean() > 0.7  # measured 0.77


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("m", [1, 3, 64])
def test_product_equals_float64_math_on_quantized_x(name, m):
    K = 768 if name.endswith("_K") else 544  # 544: 17 blocks of 32, a partial group of 16 and an odd block
    packed = random_blocks(name, 75, K, seed=1)
    x = activations(m, K, seed=2)
    got = ggml_kernels.gemv(x, packed, ggml_type(name).id, K)
    assert got.shape == (m, 75)
    assert_product(got, packed, name, x)


@pytest.mark.parametrize("name", ["Q5_0", "Q6_K"])
def test_row_stride_larger_than_row_bytes(name):
    K = 512
    packed = random_blocks(name, 40, K, seed=3)
    wide = torch.cat([packed, packed.flip(0)], dim=1)[:, : packed.shape[1]]
    assert wide.stride(0) == 2 * packed.shape[1]
    x = activations(2, K, seed=4)
    got = ggml_kernels.gemv(x, wide, ggml_type(name).id, K)
    assert torch.equal(got, ggml_kernels.gemv(x, packed, ggml_type(name).id, K))
    assert_product(got, packed, name, x)


def test_many_weights_equal_separate_calls():
    K = 512
    packed = {n: random_blocks(n, 24 + 8 * i, K, seed=10 + i) for i, n in enumerate(TYPES)}
    x = activations(3, K, seed=5)
    ids = [ggml_type(n).id for n in packed]
    outs = ggml_kernels.gemv_many(x, ggml_kernels.Weights([(p, i) for p, i in zip(packed.values(), ids)]), K)
    for (n, p), i, got in zip(packed.items(), ids, outs):
        assert torch.equal(got, ggml_kernels.gemv(x, p, i, K)), n  # same code, same quantized x: same bits


def test_switch_selects_float_activations(monkeypatch):
    K = 512
    packed = random_blocks("Q4_K", 64, K, seed=6)
    x = torch.randn(2, K, generator=torch.Generator().manual_seed(7))
    t = ggml_type("Q4_K").id
    int8 = ggml_kernels.gemv(x, packed, t, K)
    monkeypatch.setattr(ggml_kernels, "INT8_ACTIVATIONS", False)
    fp = ggml_kernels.gemv(x, packed, t, K)
    want = x.double() @ dense(packed, "Q4_K").T
    torch.testing.assert_close(fp.double(), want, atol=2e-6 * want.abs().max().item(), rtol=0)  # exact x
    assert not torch.equal(int8, fp)
    # int8 codes move each x by at most half a code step, |d|/2 of its block
    _, d, _ = quantize(x, "Q4_K")
    half_step = (d.double().abs() / 2).repeat_interleave(32, dim=1)
    assert ((int8.double() - want).abs() <= half_step @ dense(packed, "Q4_K").abs().T * (1 + 1e-5)).all()


@pytest.fixture(scope="module")
def portable(tmp_path_factory):
    """ggml_q8.c built alone with -DLH_Q8_PORTABLE: the plain-C kernels used where AVX-512 VNNI is missing."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    out = tmp_path_factory.mktemp("q8") / "portable.so"
    src = native.sources()[0].parent / "ggml_q8.c"
    subprocess.run([cc, "-O2", "-fopenmp", "-shared", "-fPIC", "-DLH_Q8_PORTABLE", str(src), "-lm", "-o", str(out)],
                   check=True, capture_output=True)
    lib = ctypes.CDLL(str(out))
    _i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.lh_q8_gemv.argtypes = [_int, _ptr, _i64, _i64, _i64, _ptr, _i64, _ptr, _int]
    lib.lh_q8_quantize.argtypes = [_int, _ptr, _i64, _i64, _ptr, _ptr, _ptr]
    assert lib.lh_q8_vnni() == 0
    return lib


@pytest.mark.parametrize("name", TYPES)
def test_portable_build_same_arithmetic(portable, name):
    K, m = 512, 3
    packed = random_blocks(name, 33, K, seed=8)
    x = activations(m, K, seed=9)
    q, d, s16 = quantize(x, name, portable)
    assert all(torch.equal(a, b) for a, b in zip((q, d, s16), quantize(x, name)))
    y = torch.empty(m, 33)
    assert portable.lh_q8_gemv(ggml_type(name).id, packed.data_ptr(), 33, packed.stride(0), K, x.data_ptr(), m,
                               y.data_ptr(), 1) == 0
    assert_product(y, packed, name, x)
