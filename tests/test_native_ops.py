"""The native per-layer glue (llamaherd/native/ops.py, ops.c) against the torch code of the model files.

Every comparison runs the same inputs through the model's reference module (or the swapped module with
`ops.disabled()`, which falls back to it) and through the native module of native/swaps.py. Tolerances, float32: the native code does the same operations in the same order except the
summations (sum of squares over a row, q.k over a head, softmax denominator and weighted sum of values),
which it adds in a different (vectorised) order than ATen. Reordering a float32 sum of n terms of one sign
moves it by at most ~n * 2^-24 relative and in practice by a few ulps; the outputs are within a few ulps of
each other plus that. `_close` allows 2e-6 relative (~16 ulps) plus 2e-6 of the tensor's scale for terms
that cancel (rotations, attention averages): a wrong weight, eps, layout, slot or mask misses by far more
(see `test_tolerance_catches_mistakes`).
"""

from __future__ import annotations

import pytest
import torch

from llamaherd import native
from llamaherd.config import ModelConfig
from llamaherd.model import gemma3, llama
from llamaherd.model.cache import KVCache
from llamaherd.model.llama4 import L2Norm
from llamaherd.model.rope import Rotary, apply_rope
from llamaherd.native import ops
from llamaherd.native.swaps import native_module

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler: the native ops cannot be built")


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6 * scale)


# ---- RMSNorm -------------------------------------------------------------------------------------------------

NORM_SHAPES = [(1, 1, 640), (1, 1, 4, 256), (3, 5, 17), (2, 7, 1), (1, 300, 640)]  # the last: threaded rows


@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("module", [llama.RMSNorm, gemma3.GemmaRMSNorm])
def test_rms_norm_matches_torch(shape, module):
    torch.manual_seed(0)
    norm = module(shape[-1], eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(0.0, 0.5)
    x = torch.randn(shape) * 3.0
    fast = native_module(norm)
    assert type(fast) is not module and fast.weight is norm.weight
    with torch.inference_mode():
        assert ops.usable(x, norm.weight)
        want = norm(x)
        with ops.disabled():
            assert torch.equal(fast(x), want)  # switched off: the reference itself
        got = fast(x)
    assert got.shape == want.shape and got.dtype == torch.float32
    _close(got, want)


@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_parameter_free_norm_matches_torch(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = L2Norm(1e-6)(x)
        got = native_module(L2Norm(1e-6))(x)
    _close(got, want)


def test_rms_norm_rejects_a_weight_of_another_width():
    with pytest.raises(ValueError):
        ops.rms_norm(torch.randn(2, 8), torch.ones(7), 1e-6)


# ---- rotary embedding ----------------------------------------------------------------------------------------

ROPE_SHAPES = [  # x (B, T, H, D), angle rows (1 or B)
    ((1, 1, 4, 256), 1), ((2, 5, 3, 6), 1), ((2, 5, 3, 6), 2), ((3, 7, 1, 2), 3), ((1, 300, 4, 64), 1),  # threaded
]


@pytest.mark.parametrize("shape,angle_rows", ROPE_SHAPES)
@pytest.mark.parametrize("reference,layout", [(apply_rope, ops.PAIRS), (gemma3.apply_rope_halves, ops.HALVES)])
def test_rope_matches_torch(shape, angle_rows, reference, layout):
    g = torch.Generator().manual_seed(5)
    B, T, H, D = shape
    x = torch.randn(shape, generator=g)
    angles = torch.rand(angle_rows, T, D // 2, generator=g) * 50.0
    cos, sin = torch.cos(angles), torch.sin(angles)
    with torch.inference_mode():
        assert ops.rope_applies(x, cos, sin)
        want = reference(x, cos, sin)
        got = ops.rope(x, cos, sin, layout=layout)
    _close(got, want)


def test_rope_falls_back_for_other_shapes_and_strides():
    x, cos, sin = torch.randn(2, 5, 3, 8), torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    with torch.inference_mode():
        assert ops.rope_applies(x, cos, sin)
        assert not ops.rope_applies(x.transpose(1, 2), cos, sin)  # (B, H, T, D) view
        assert not ops.rope_applies(x, cos[:, :4], sin[:, :4])
        assert not ops.rope_applies(x, cos[None], sin[None])
        assert not ops.rope_applies(x[..., :7], cos, sin)
        strided = x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, (B, T, H, D) strides differ
        fast = native_module(Rotary())
        assert type(fast) is not Rotary
        assert torch.equal(fast(strided, cos, sin), apply_rope(strided, cos, sin))


# ---- fallbacks -----------------------------------------------------------------------------------------------


def test_usable_conditions():
    x, w = torch.randn(2, 3, 8), torch.randn(8)
    with torch.inference_mode():
        assert ops.usable(x, w, None)
        assert not ops.usable(x.transpose(0, 1), w)  # strided view
        assert not ops.usable(x.bfloat16(), w)
        assert not ops.usable(x.double(), w)
        with ops.disabled():
            assert not ops.usable(x, w)
        with native.disabled():
            assert not ops.usable(x, w)
        assert ops.usable(x, w)
    p = torch.nn.Parameter(w.clone())
    assert not ops.usable(x, p)  # grad enabled and a tensor needs one
    with torch.no_grad():
        assert ops.usable(x, p)


@pytest.mark.parametrize("module", [llama.RMSNorm, gemma3.GemmaRMSNorm])
def test_norm_falls_back_for_strided_bf16_and_grad(module):
    torch.manual_seed(2)
    norm = module(16)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(4, 3, 16)
    strided = x.transpose(0, 1)
    fast = native_module(norm)
    with torch.inference_mode():
        want, want_bf16 = norm(strided), norm(x.bfloat16())
        assert torch.equal(fast(strided), want)  # the torch path itself, bit for bit
        assert torch.equal(fast(x.bfloat16()), want_bf16)
    norm = fast
    out = norm(x)  # grad enabled, weight requires grad: the torch path, differentiable
    assert out.grad_fn is not None
    out.sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0


# ---- one-token attention -------------------------------------------------------------------------------------


def config(arch: str, n_heads: int, n_kv_heads: int, head_dim: int) -> ModelConfig:
    return ModelConfig(arch=arch, dim=48, n_layers=3, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
                       hidden_dim=64, vocab_size=32, norm_eps=1e-6, rope_theta=1e4, max_seq_len=64,
                       query_pre_attn_scalar=20.0 if arch == "gemma3" else None)


def attention(arch: str, n_heads: int, n_kv_heads: int, head_dim: int, seed: int = 0):
    torch.manual_seed(seed)
    c = config(arch, n_heads, n_kv_heads, head_dim)
    attn = (gemma3.Attention(c) if arch == "gemma3" else llama.Attention(c)).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, 0.3)
    return c, attn


def step_inputs(c: ModelConfig, B: int, start: int, per_row: bool, seed: int = 1):
    """A cache with `start` random slots filled, one new token's input x and its rotary angles."""
    g = torch.Generator().manual_seed(seed)
    cache = KVCache.for_model(c, B, start + 3)
    cache.k[:, :, :, :start] = torch.randn(cache.k[:, :, :, :start].shape, generator=g)
    cache.v[:, :, :, :start] = torch.randn(cache.v[:, :, :, :start].shape, generator=g)
    cache.length = start
    x = torch.randn(B, 1, c.dim, generator=g)
    positions = (torch.arange(B)[:, None] * 3 + start) if per_row else torch.tensor([[start]])
    from llamaherd.model.rope import inv_frequencies, rope_angles

    cos, sin = rope_angles(positions, inv_frequencies(c.head_dim, c.rope_theta))
    return cache, x, cos, sin


def run_both(attn, cache, x, cos, sin, mask, layer, start):
    """(native output, native cache) and (torch output, torch cache) for the same step."""
    attn = native_module(attn)
    results = []
    for on in (True, False):
        c = KVCache(cache.k.shape[0], cache.batch, cache.max_len, cache.k.shape[2], cache.k.shape[4])
        c.k.copy_(cache.k), c.v.copy_(cache.v)
        with torch.inference_mode():
            q = attn.wq(x).view(x.shape[0], 1, attn.n_heads, attn.head_dim)
            k = attn.wk(x).view(x.shape[0], 1, attn.n_kv_heads, attn.head_dim)
            v = attn.wv(x).view(x.shape[0], 1, attn.n_kv_heads, attn.head_dim)
            weights = (attn.q_norm.weight, attn.k_norm.weight) if isinstance(attn, gemma3.Attention) else ()
            if on:  # the native side must really take the native path
                assert ops.attend_decode_applies(q, k, v, cos, sin, c.k, c.v, start, mask, *weights)
            ops.ENABLED = on
            try:
                out = attn(x, cos, sin, mask, c, layer, start)
            finally:
                ops.ENABLED = True
        results.append((out, c))
    return results


CASES = [  # arch, heads, kv heads, head dim, batch, start, per-row positions
    ("llama", 4, 2, 8, 1, 5, False),
    ("llama", 4, 4, 6, 2, 0, True),  # first slot: attends to itself only
    ("gemma3", 4, 1, 16, 1, 9, False),  # Gemma 270M's grouping (4 q heads on 1 kv head)
    ("gemma3", 6, 2, 10, 3, 13, True),
    ("llama", 2, 1, 64, 2, 40, False),  # enough work for the threaded head split
]


@pytest.mark.parametrize("arch,Hq,Hkv,D,B,start,per_row", CASES)
def test_attend_decode_matches_torch(arch, Hq, Hkv, D, B, start, per_row):
    c, attn = attention(arch, Hq, Hkv, D)
    cache, x, cos, sin = step_inputs(c, B, start, per_row)
    (got, got_cache), (want, want_cache) = run_both(attn, cache, x, cos, sin, None, 1, start)
    _close(got, want)
    _close(got_cache.k, want_cache.k)  # the rotated (and normalised) key landed in the same slot
    assert torch.equal(got_cache.v, want_cache.v)  # values are copied as they are


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("mask_rows", [1, 2])
def test_attend_decode_with_masks(arch, mask_rows):
    """Left-padded rows (key_mask) and a sliding window: masks of (B or 1, 1, 1, S)."""
    c, attn = attention(arch, 4, 2, 8)
    start = 11
    cache, x, cos, sin = step_inputs(c, 2, start, per_row=True)
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(mask_rows, 1, 1, start + 1, generator=g) > 0.4
    mask[..., start] = True  # every query sees its own slot (llama.attention_mask's contract)
    mask[0, ..., :3] = False
    (got, got_cache), (want, want_cache) = run_both(attn, cache, x, cos, sin, mask, 2, start)
    _close(got, want)
    _close(got_cache.k, want_cache.k)
    window = gemma3.window_mask(start, 1, None, 4, torch.device("cpu"))
    (got, _), (want, _) = run_both(attn, cache, x, cos, sin, window, 0, start)
    _close(got, want)


def test_attend_decode_applies_only_to_its_case():
    c, attn = attention("llama", 4, 2, 8)
    cache, x, cos, sin = step_inputs(c, 1, 5, per_row=False)
    q, k, v = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8)
    kv = cache.k, cache.v
    with torch.inference_mode():
        assert ops.attend_decode_applies(q, k, v, cos, sin, *kv, 5, None)
        assert not ops.attend_decode_applies(q, k, v, cos, sin, *kv, cache.max_len, None)  # overflow: torch raises
        assert not ops.attend_decode_applies(q, k, v, cos, sin, cache.k[:, :, :1], cache.v[:, :, :1], 5, None)  # heads
        two = torch.randn(1, 2, 4, 8)
        assert not ops.attend_decode_applies(two, k, v, cos, sin, *kv, 5, None)  # two tokens (prefill)
        assert not ops.attend_decode_applies(q, k, v, cos, sin, *kv, 5, torch.ones(1, 1, 1, 6))  # float mask
        assert not ops.attend_decode_applies(q, k, v, cos, sin, *kv, 5, torch.ones(1, 1, 1, 5, dtype=torch.bool))
        bf16 = KVCache.for_model(c, 1, 8, dtype=torch.bfloat16)
        assert not ops.attend_decode_applies(q, k, v, cos, sin, bf16.k, bf16.v, 5, None)
        assert not ops.attend_decode_applies(q.transpose(2, 3).contiguous().transpose(2, 3), k, v, cos, sin, *kv,
                                             5, None)  # strided heads
        with ops.disabled():
            assert not ops.attend_decode_applies(q, k, v, cos, sin, *kv, 5, None)
    assert not ops.attend_decode_applies(q, k, v, cos, sin, *kv, 5, None, torch.nn.Parameter(torch.ones(8)))


def test_tolerance_catches_mistakes():
    """The comparisons above can fail: a wrong eps, a wrong rotary layout or a wrong slot all exceed _close."""
    c, attn = attention("llama", 4, 2, 8)
    cache, x, cos, sin = step_inputs(c, 1, 5, per_row=False)
    with torch.inference_mode():
        q = attn.wq(x).view(1, 1, 4, 8)
        k, v = attn.wk(x).view(1, 1, 2, 8), attn.wv(x).view(1, 1, 2, 8)
        kv = cache.k, cache.v
        pairs = ops.attend_decode(q, k, v, cos, sin, *kv, 0, 5, None, layout=ops.PAIRS)
        halves = ops.attend_decode(q, k, v, cos, sin, *kv, 0, 5, None, layout=ops.HALVES)
        other_slot = ops.attend_decode(q, k, v, cos, sin, *kv, 0, 4, None, layout=ops.PAIRS)
        xs = torch.randn(3, 640) * 1e-3
        with pytest.raises(AssertionError):
            _close(ops.rms_norm(xs, None, 1e-6), ops.rms_norm(xs, None, 1.01e-6))
    for wrong in (halves, other_slot):
        with pytest.raises(AssertionError):
            _close(wrong, pairs)


# ---- whole models ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_cached_decode_of_a_model_matches_torch_glue(arch):
    from llamaherd.engine.generate import decode_one, prefill
    from llamaherd.model import build

    c = ModelConfig(arch=arch, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=96,
                    vocab_size=128, norm_eps=1e-6, rope_theta=1e4, rope_local_theta=1e4 if arch == "gemma3" else None,
                    max_seq_len=64, tie_embeddings=True, sliding_window=4 if arch == "gemma3" else None,
                    sliding_window_pattern=2 if arch == "gemma3" else None)
    torch.manual_seed(4)
    net = build(c).float().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.2)
    from llamaherd.native import swaps

    assert swaps.apply(net) > 0
    logits = {}
    with torch.inference_mode():
        for on in (True, False):
            ops.ENABLED = on
            try:
                cache = KVCache.for_model(c, 1, 16)
                out = [prefill(net, torch.tensor([[1, 5, 9]]), cache)]
                for t in (7, 3, 2, 11, 6, 8):  # past the window of 4
                    out.append(decode_one(net, torch.tensor([t]), cache))
            finally:
                ops.ENABLED = True
            logits[on] = torch.stack(out)
    # Errors compound over 4 layers and 7 steps: allow 1e-5 of the logit scale.
    torch.testing.assert_close(logits[True], logits[False], rtol=0, atol=1e-5 * float(logits[False].abs().max()))
