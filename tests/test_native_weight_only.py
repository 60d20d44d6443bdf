"""The native int8/int4 weight-only kernels (llamaherd/native/weight_only.c) against float64 products of the
dequantised weights, every row count, tail and group size, with float32 and with int16 activations; the switch
back to torch's kernels; the sibling calls.

Tolerance: the kernels multiply the exact dequantised weights (int8: the row's float32 dot product times its
scale; int4: (q - 8) * s + z, exact in float32) by exact float32 activations, so the only error is float32
summation, bounded by K * 2^-24 * sum_k |x_k w_k| (Higham, Accuracy and Stability of Numerical Algorithms,
eq. 3.5, first order). A wrong nibble, group or scale is off by O(1) of that sum, far above the bound.
With int16 activations (`INT16_ACTIVATIONS`, `INT8_ACTIVATIONS` off) each activation moves by at most half its row's
step amax / 32767, which adds at most amax / 65534 * sum_k |w_k| per output.

int4 and int8 weights on int8 activations (`INT8_ACTIVATIONS`, the default, weight_only_a8.c) are checked against
float64 products of the Q8_0 blocks gguf-py's reference quantizer makes of the same rows (llama.cpp's rounding,
independent of llamaherd) and the same codes: exact up to float32 summation; then against the dequantised float
product and the int16 path (the activation rounding's error only), through the per-module calls (the one-call
decode step on the same kinds: tests/test_native_step_dense.py). With the switch off, int8 weights are the int16
path's numbers: the exact integer products of the int16 codes, up to their float32 conversion.
"""

from __future__ import annotations

import gguf
import gguf.quants
import numpy as np
import pytest
import torch

from llamaherd import native
from llamaherd.native import weight_only as nw
from llamaherd.quant import weight_only as wo

pytestmark = pytest.mark.skipif(not nw.available(), reason="needs the native library (a C compiler)")


@pytest.fixture
def float_activations():
    """The exact path: float32 activations (INT16_ACTIVATIONS off), so the float64 bound below holds."""
    with native.switched_off(nw, "INT16_ACTIVATIONS"):
        yield


# The formats' rules restated independently of llamaherd (gpt-fast quantize.py):
#   int8: w = q * scale[n];   int4: w = (q - 8) * scale[k // g, n] + zero[k // g, n], byte j = q[2j] << 4 | q[2j+1]
def _int8_f64(q, s):
    return q.double() * s.double()[:, None]


def _int4_f64(packed, s, z, group, magnitudes=False):
    p = packed.to(torch.int64)
    q = torch.stack([p // 16, p % 16], dim=2).reshape(p.shape[0], -1).double()
    g = torch.arange(q.shape[1]) // group
    if magnitudes:  # |s (q - 8)| + |z|: the terms of the bf16 path's s * sum x (q - 8) + z * sum x
        return (q - 8).abs() * s.double().abs()[g].t() + z.double().abs()[g].t()
    return (q - 8) * s.double()[g].t() + z.double()[g].t()


def _assert_within_bound(y, x, w64, terms=None):
    """|error| <= K 2^-24 sum_k |x_k| t_k, t = |w| or the magnitudes of the terms the kernel sums."""
    x64 = x.double().reshape(-1, x.shape[-1])
    want = x64 @ w64.t()
    bound = w64.shape[1] * 2.0**-24 * (x64.abs() @ (w64.abs() if terms is None else terms).t())
    err = (y.double().reshape(want.shape) - want).abs()
    assert (err <= bound + 1e-30).all(), float((err / bound).max())


def _int8_codes(N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return wo.quantize_int8(torch.randn(N, K, generator=g))


def _int4_codes(N, K, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    return wo.quantize_int4(torch.randn(N, K, generator=g) * 0.05 + 0.01, group)


@pytest.mark.parametrize("N,K", [(1, 16), (7, 40), (37, 96), (64, 2048), (300, 513)])
@pytest.mark.parametrize("M", [1, 3, 4, 5, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_equals_float64_math(N, K, M, dtype, float_activations):
    q, s = _int8_codes(N, K)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1)).to(dtype)
    (y,) = nw.int8(x, [(q, s)], torch.float32)
    _assert_within_bound(y, x, _int8_f64(q, s))


@pytest.mark.parametrize("N,K,group", [(5, 32, 32), (37, 128, 32), (64, 256, 64), (130, 1024, 128), (3, 384, 128),
                                       (9, 96, 32)])
@pytest.mark.parametrize("M", [1, 2, 4, 7, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_equals_float64_math(N, K, group, M, dtype, float_activations):
    q, s, z = _int4_codes(N, K, group)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(2)).to(dtype)
    (y,) = nw.int4(x, [(q, s, z)], group, torch.float32)
    _assert_within_bound(y, x, _int4_f64(q, s, z, group), _int4_f64(q, s, z, group, magnitudes=True))


def test_bf16_output_is_the_float32_result_rounded(float_activations):
    q, s, z = _int4_codes(70, 256, 64)
    x = torch.randn(3, 256).bfloat16()
    (y32,) = nw.int4(x, [(q, s, z)], 64, torch.float32)
    (y16,) = nw.int4(x, [(q, s, z)], 64, torch.bfloat16)
    assert torch.equal(y16, y32.bfloat16())


def test_several_weights_in_one_call_equal_one_at_a_time():
    x = torch.randn(2, 1, 256).bfloat16()
    members = [_int4_codes(n, 256, 32, seed=n) for n in (64, 16, 16)]
    together = nw.int4(x, members, 32)
    for m, y in zip(members, together):
        assert y.shape == (2, 1, m[0].shape[0])
        assert torch.equal(y, nw.int4(x, [m], 32)[0])
    for K in (100, 96):  # int8 weights on int16 codes (K % 32 != 0) and on int8 blocks
        members8 = [_int8_codes(n, K, seed=n) for n in (8, 12)]
        for m, y in zip(members8, nw.int8(x[..., :K], members8)):
            assert torch.equal(y, nw.int8(x[..., :K], [m])[0])


def test_bad_codes_and_inputs_are_refused():
    q, s = _int8_codes(8, 32)
    with pytest.raises(ValueError, match="scales"):
        nw.int8(torch.randn(1, 32), [(q, s.float())])
    with pytest.raises(ValueError, match="rows"):
        nw.int8(torch.randn(17, 32), [(q, s)])
    with pytest.raises(ValueError, match="groups"):
        nw.Codes([_int4_codes(8, 96, 32)], "int4", 48)
    assert not nw.applies(torch.randn(17, 32), 32) and not nw.applies(torch.randn(1, 32).half(), 32)


@pytest.mark.parametrize("spec", ["int8", "int4-g32"])
def test_modules_native_and_torch_paths_agree(spec):
    """The swapped modules: the native path (decode rows) against torch's kernels (the reference, switched)."""
    lin = torch.nn.Linear(256, 96, bias=False)
    mod = wo.make_module(*wo.parse_scheme(spec), lin.weight.detach())
    x = torch.randn(1, 3, 256).bfloat16()
    with torch.inference_mode():
        got = mod(x)
        with nw.switched_off():
            want = mod(x)
        with native.disabled():
            assert torch.equal(mod(x), want)
    assert got.dtype == want.dtype == torch.bfloat16
    # both round a float32 sum to bf16; the torch kernels also round their bf16 products: a few bf16 steps apart
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_sibling_results_do_not_depend_on_call_order():
    weights = [torch.randn(n, 128) for n in (64, 32, 32)]
    mods = [wo.Int4Linear.from_linear(w, 32) for w in weights]
    group = wo.Siblings(mods)
    for m in mods:
        m.siblings = group
    x, other = torch.randn(1, 128), torch.randn(1, 128)
    with torch.inference_mode():
        alone = [nw.int4(x, [(m.qweight, m.scales, m.zeros)], 32)[0] for m in mods]
        first = mods[0](x)
        assert torch.equal(mods[2](other), nw.int4(other, [(mods[2].qweight, mods[2].scales, mods[2].zeros)], 32)[0])
        assert torch.equal(mods[1](x), alone[1]) and torch.equal(first, alone[0])
        assert torch.equal(mods[2](x), alone[2])


@pytest.mark.parametrize("scheme,N,K,group", [("int8", 37, 96, None), ("int8", 64, 2048, None), ("int8", 5, 9000, None),
                                              ("int4", 37, 128, 32), ("int4", 130, 1024, 128), ("int4", 9, 96, 32)])
@pytest.mark.parametrize("M", [1, 5, 16])
def test_int16_activations_within_their_rounding(scheme, N, K, group, M, monkeypatch):
    assert nw.INT16_ACTIVATIONS
    monkeypatch.setattr(nw, "INT8_ACTIVATIONS", False)  # int16 codes, whatever the default
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(3)).bfloat16()
    x[0, 7] = 40.0  # an outlier sets the row's step
    if scheme == "int8":
        q, s = _int8_codes(N, K)
        (y,) = nw.int8(x, [(q, s)], torch.float32)
        w64 = terms = _int8_f64(q, s)
    else:
        q, s, z = _int4_codes(N, K, group)
        (y,) = nw.int4(x, [(q, s, z)], group, torch.float32)
        w64, terms = _int4_f64(q, s, z, group), _int4_f64(q, s, z, group, magnitudes=True)
    x64 = x.double()
    step = x64.abs().amax(1, keepdim=True) / 32767
    bound = (step / 2) @ terms.abs().sum(1, keepdim=True).t() + K * 2.0**-24 * (x64.abs() @ terms.t())
    err = (y.double() - x64 @ w64.t()).abs()
    assert (err <= bound * 1.001).all(), float((err / bound).max())
    with native.switched_off(nw, "INT16_ACTIVATIONS"):  # and it is not the float path's result
        members = [(q, s)] if scheme == "int8" else [(q, s, z)]
        exact = nw.Codes(members, scheme, group)(x, torch.float32)[0]
    assert torch.equal(exact, y) == (scheme == "int4" and K % 64 != 0)  # int4's int16 path takes K % 64 == 0


def test_a_nan_activation_row_gives_nan_outputs():
    q, s = _int8_codes(8, 64)
    x = torch.randn(2, 64)
    x[1, 3] = float("nan")
    (y,) = nw.int8(x, [(q, s)])
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all()


# ---- int4 weights on int8 activations (weight_only_a8.c) -------------------------------------------------------

@pytest.fixture
def int8_activations(monkeypatch):
    monkeypatch.setattr(nw, "INT16_ACTIVATIONS", True)
    monkeypatch.setattr(nw, "INT8_ACTIVATIONS", True)


def _q8_0(x: torch.Tensor) -> torch.Tensor:
    """x (M, K) as gguf-py's Q8_0 blocks (block_q8_0: float16 d, 32 int8 codes) dequantised in float64."""
    blocks = gguf.quants.quantize(x.float().numpy(), gguf.GGMLQuantizationType.Q8_0).reshape(x.shape[0], -1, 34)
    d = blocks[..., :2].copy().view(np.float16).astype(np.float64)
    q = blocks[..., 2:].copy().view(np.int8).astype(np.float64)
    return torch.from_numpy((d * q).reshape(x.shape))


def _a8_terms(packed, s, z, group):
    """|q s| + |z - 8 s|, bounded by q |s| + |z| + 8 |s|: the magnitudes of the terms the int8 path sums."""
    p = packed.to(torch.int64)
    q = torch.stack([p // 16, p % 16], dim=2).reshape(p.shape[0], -1).double()
    g = torch.arange(q.shape[1]) // group
    s, z = s.double().abs()[g].t(), z.double().abs()[g].t()
    return q * s + z + 8 * s


@pytest.mark.parametrize("N,K,group", [(5, 128, 32), (37, 256, 64), (131, 1024, 128), (9, 384, 96), (3, 512, 256)])
@pytest.mark.parametrize("M", [1, 2, 4, 5, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_on_int8_activations_equals_float64_of_the_q8_0_blocks(N, K, group, M, dtype, int8_activations):
    q, s, z = _int4_codes(N, K, group)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(4)).to(dtype)
    x[0, 5] = 9.0  # an outlier in one block only
    (y,) = nw.int4(x, [(q, s, z)], group, torch.float32)
    _assert_within_bound(y, _q8_0(x), _int4_f64(q, s, z, group), _a8_terms(q, s, z, group))


def test_int4_on_int8_activations_with_float32_scales(int8_activations):
    """GPTQ / AWQ's float32 scales and zeros (quant/hf_quantized.py's PackedLinear) through the same path."""
    q, s, z = _int4_codes(40, 256, 128)
    s, z = s.float() * 1.001, z.float() * 0.999  # not bf16 values
    x = torch.randn(3, 256)
    (y,) = nw.int4(x, [(q, s, z)], 128, torch.float32)
    _assert_within_bound(y, _q8_0(x), _int4_f64(q, s, z, 128), _a8_terms(q, s, z, 128))


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int8_activations_stay_near_the_float_product_and_the_int16_path(group, int8_activations):
    """The activation rounding alone: per 32 elements half a step of amax / 127 (Q8_0), a relative error of the
    outputs of about 1e-3 on Gaussian rows; 1e-2 fails a wrong scale, block or sum, which are O(1)."""
    q, s, z = _int4_codes(96, 2048, group)
    x = torch.randn(7, 2048, generator=torch.Generator().manual_seed(5)).bfloat16()
    (y8,) = nw.int4(x, [(q, s, z)], group, torch.float32)
    want = x.double() @ _int4_f64(q, s, z, group).t()
    with native.switched_off(nw, "INT8_ACTIVATIONS"):
        (y16,) = nw.int4(x, [(q, s, z)], group, torch.float32)
    for other in (want, y16.double()):
        rel = float((y8.double() - other).norm() / other.norm())
        assert 1e-5 < rel < 1e-2, rel  # near, and not the same numbers: the int8 path ran
    assert float((y16.double() - want).norm() / want.norm()) < 1e-4  # the int16 path is much closer


@pytest.mark.parametrize("K,group,path", [(192, 64, "int16"), (96, 32, "float")])
def test_int8_activations_need_k_a_multiple_of_128(K, group, path, int8_activations):
    """Other widths take the next path down, as their own switch setting gives it."""
    q, s, z = _int4_codes(11, K, group)
    x = torch.randn(2, K)
    (got,) = nw.int4(x, [(q, s, z)], group, torch.float32)
    with native.switched_off(nw, "INT8_ACTIVATIONS"):
        (want,) = nw.int4(x, [(q, s, z)], group, torch.float32)
    assert torch.equal(got, want)


def test_switch_off_gives_the_int16_path_and_float_activations_override_it(monkeypatch):
    """INT8_ACTIVATIONS off is the int16 path (its bound: test_int16_activations_within_their_rounding), for int4
    and int8 weights alike; INT16_ACTIVATIONS off is the float32 path whatever INT8 says."""
    q4, s4, z4 = _int4_codes(33, 256, 128)
    q8, s8 = _int8_codes(33, 256)
    x = torch.randn(2, 256)
    runs = {}
    for a16 in (True, False):
        for a8 in (True, False):
            monkeypatch.setattr(nw, "INT16_ACTIVATIONS", a16)
            monkeypatch.setattr(nw, "INT8_ACTIVATIONS", a8)
            runs[a16, a8] = nw.int4(x, [(q4, s4, z4)], 128, torch.float32)[0], nw.int8(x, [(q8, s8)], torch.float32)[0]
    for w in (0, 1):
        assert torch.equal(runs[False, True][w], runs[False, False][w])  # float32 path
        assert not torch.equal(runs[True, True][w], runs[True, False][w])
        assert not torch.equal(runs[True, False][w], runs[False, False][w])


def _int16_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's int16 codes and step, as the int16 path defines them: amax / 32767, round half to even."""
    x = x.float()
    amax = x.abs().amax(1, keepdim=True)
    return torch.round(x * (torch.tensor(32767.0) / amax)), amax / 32767.0


@pytest.mark.parametrize("N,K,M", [(37, 96, 1), (64, 2048, 5), (9, 100, 16)])
def test_int8_weights_with_the_switch_off_are_the_int16_codes_products(N, K, M, monkeypatch):
    """The int16 numbers as before weight_only_a8.c took int8 weights: the exact integer dot products of the
    int16 codes and the int8 codes, times the row's step and the weight's scale; the only error is the float32
    conversion of the int32 lanes and their sum (16 lanes: 20 roundings, far under one int16 code step)."""
    monkeypatch.setattr(nw, "INT8_ACTIVATIONS", False)
    q, s = _int8_codes(N, K)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(6)).bfloat16()
    (y,) = nw.int8(x, [(q, s)], torch.float32)
    codes, step = _int16_codes(x)
    dots = codes.to(torch.int64) @ q.to(torch.int64).t()  # exact
    want = dots.double() * s.double() * step.double()
    bound = 20 * 2.0**-24 * (codes.abs().double() @ q.abs().double().t()) * s.double() * step.double()
    assert ((y.double() - want).abs() <= bound).all()


# ---- int8 weights on int8 activations (weight_only_a8.c) -------------------------------------------------------

@pytest.mark.parametrize("N,K", [(1, 32), (7, 96), (37, 256), (131, 2048), (5, 8192)])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_on_int8_activations_equals_float64_of_the_q8_0_blocks(N, K, M, dtype, int8_activations):
    """Every row count's tile (1-4 rows and four of them), odd N (a last block of 1-3 weight rows), K with a
    last half chunk of 32 (96) and whole ones; the integer sums are exact, so the bound is float32 summation."""
    q, s = _int8_codes(N, K, seed=N)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(7)).to(dtype)
    x[0, 5] = 9.0  # an outlier in one block only
    (y,) = nw.int8(x, [(q, s)], torch.float32)
    _assert_within_bound(y, _q8_0(x), _int8_f64(q, s))


def test_int8_on_int8_activations_stays_near_the_float_product_and_the_int16_path(int8_activations):
    """The activation rounding alone, as for int4 above: about 1e-3 of the outputs' norm on Gaussian rows."""
    q, s = _int8_codes(96, 2048)
    x = torch.randn(7, 2048, generator=torch.Generator().manual_seed(8)).bfloat16()
    (y8,) = nw.int8(x, [(q, s)], torch.float32)
    want = x.double() @ _int8_f64(q, s).t()
    with native.switched_off(nw, "INT8_ACTIVATIONS"):
        (y16,) = nw.int8(x, [(q, s)], torch.float32)
    for other in (want, y16.double()):
        rel = float((y8.double() - other).norm() / other.norm())
        assert 1e-5 < rel < 1e-2, rel
    assert float((y16.double() - want).norm() / want.norm()) < 1e-4


@pytest.mark.parametrize("K", [16, 100, 200])
def test_int8_weights_take_int16_codes_when_k_is_not_a_multiple_of_32(K, int8_activations):
    q, s = _int8_codes(11, K)
    x = torch.randn(3, K)
    (got,) = nw.int8(x, [(q, s)], torch.float32)
    with native.switched_off(nw, "INT8_ACTIVATIONS"):
        (want,) = nw.int8(x, [(q, s)], torch.float32)
    assert torch.equal(got, want)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_int8_activations_carry_nan_and_inf_rows_to_nan_outputs(bad, scheme, int8_activations):
    x = torch.randn(3, 128)
    x[1, 70] = bad
    if scheme == "int4":
        (y,) = nw.int4(x, [_int4_codes(8, 128, 32)], 32)
    else:
        (y,) = nw.int8(x, [_int8_codes(8, 128)])
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[2]).all() and torch.isnan(y[1]).all()
