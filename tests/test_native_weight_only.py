"""The native int8/int4 weight-only kernels (llamaherd/native/weight_only.c) against float64 products of the
dequantised weights, every row count, tail and group size, with float32 and with int16 activations; the switch
back to torch's kernels; the sibling calls.

Tolerance: the kernels multiply the exact dequantised weights (int8: the row's float32 dot product times its
scale; int4: (q - 8) * s + z, exact in float32) by exact float32 activations, so the only error is float32
summation, bounded by K * 2^-24 * sum_k |x_k w_k| (Higham, Accuracy and Stability of Numerical Algorithms,
eq. 3.5, first order). A wrong nibble, group or scale is off by O(1) of that sum, far above the bound.
With int16 activations (the default, `INT16_ACTIVATIONS`) each activation moves by at most half its row's
step amax / 32767, which adds at most amax / 65534 * sum_k |w_k| per output.
"""

from __future__ import annotations

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
    members8 = [_int8_codes(n, 100, seed=n) for n in (8, 12)]
    for m, y in zip(members8, nw.int8(x[..., :100], members8)):
        assert torch.equal(y, nw.int8(x[..., :100], [m])[0])


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
def test_int16_activations_within_their_rounding(scheme, N, K, group, M):
    assert nw.INT16_ACTIVATIONS
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
