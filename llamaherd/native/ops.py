"""Fused per-layer glue of the decoders in native code (llamaherd/native/ops.c): RMSNorm, rotary embedding, and
one token's attention step (per-head q/k norm, rotary embedding, KV-cache write, softmax attention) in one call.

Why: a decode step runs these on a few hundred values per layer, and in torch each is 5-15 aten ops of ~1 us
dispatch apiece (one Gemma norm ~15 us, the attention glue ~80 us per layer); one ctypes call (~2 us) does the
arithmetic in less. Over many rows (prefill) the native loops are also faster than torch's chains of
temporaries, so norms and rotary use them at every length. Measured in bench/PROFILE.md section 10.

The model files hold only the torch code, the reference; `native/swaps.py` substitutes, after loading, modules
that call these functions when they apply and the reference code otherwise.

`usable` (and `attend_decode_applies`, which builds on it) is the one condition: this module switched on
(`ENABLED`, and the whole native library: `llamaherd.native.ENABLED`), the library built, and every tensor
float32, on the CPU, contiguous, and not part of an autograd graph. Anything else (other dtypes or devices,
strided views, training) takes the torch path. `ENABLED` is separate from `native.disabled()` so that the
glue can be benchmarked on and off while the matrix kernels stay on.
"""

from __future__ import annotations

import ctypes
import sys

import torch

from .. import native

ENABLED = True  # module switch for the fused glue only; llamaherd.native.ENABLED switches off everything

# The enums of ops.c.
_NO_WEIGHT, _WEIGHT, _ONE_PLUS_WEIGHT = 0, 1, 2
NO_ROPE, PAIRS, HALVES = 0, 1, 2  # rotary layouts: none, Meta's adjacent pairs, HF/NEOX halves

_i64, _ptr, _int, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "lh_ops_rms_norm": [_ptr, _ptr, _int, _f32, _i64, _i64, _ptr, _int],
    "lh_ops_rope": [_ptr, _i64, _i64, _i64, _ptr, _ptr, _i64, _int, _int, _ptr, _int],
    "lh_ops_attend_decode": [_ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _int, _ptr, _ptr, _int, _f32, _f32,
                             _ptr, _ptr, _i64, _int, _ptr, _ptr, _i64, _i64, _ptr, _i64, _f32, _ptr, _int],
}


def _fn(name: str):
    return native.function(name, _SIGNATURES[name])


def usable(*tensors: torch.Tensor | None) -> bool:
    """Whether the native ops apply to these tensors (None entries are skipped): see the module docstring."""
    if not ENABLED:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if t.dtype != torch.float32 or not t.is_cpu or not t.is_contiguous() or (grad and t.requires_grad):
            return False
    return native.library() is not None  # None also under native.disabled()


def disabled():
    """Run the enclosed code with the torch glue (the native matrix kernels stay on)."""
    return native.switched_off(sys.modules[__name__])


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, *, plus_one: bool = False) -> torch.Tensor:
    """x / sqrt(mean(x^2, -1) + eps), times `weight` (Meta), `1 + weight` (Gemma, `plus_one`) or nothing (None).

    For tensors that pass `usable`; the result is a new contiguous tensor of x's shape.
    """
    dim = x.shape[-1]
    if weight is not None and weight.shape != (dim,):
        raise ValueError(f"norm weight of shape {tuple(weight.shape)} for rows of {dim}")
    out = torch.empty_like(x)
    mode = _NO_WEIGHT if weight is None else _ONE_PLUS_WEIGHT if plus_one else _WEIGHT
    _fn("lh_ops_rms_norm")(x.data_ptr(), None if weight is None else weight.data_ptr(), mode, eps,
                           x.numel() // dim if dim else 0, dim, out.data_ptr(), torch.get_num_threads())
    return out


def rope_applies(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether `rope` takes x (B, T, H, D) with angles (B or 1, T, D/2): shapes as the models pass them, `usable`."""
    if x.dim() != 4 or cos.dim() != 3 or x.shape[-1] % 2:
        return False
    B, T, _, D = x.shape
    if cos.shape[1:] != (T, D // 2) or cos.shape[0] not in (1, B) or sin.shape != cos.shape:
        return False
    return usable(x, cos, sin)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, layout: int) -> torch.Tensor:
    """x (B, T, H, D) rotated by the angles cos/sin (B or 1, T, D/2) in `layout` (PAIRS or HALVES): a new tensor.

    For inputs that pass `rope_applies`.
    """
    B, T, H, D = x.shape
    out = torch.empty_like(x)
    _fn("lh_ops_rope")(x.data_ptr(), B * T, H, D, cos.data_ptr(), sin.data_ptr(), T, cos.shape[0] == 1, layout,
                       out.data_ptr(), torch.get_num_threads())
    return out


def attend_decode_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          cache_k: torch.Tensor, cache_v: torch.Tensor, start: int, mask: torch.Tensor | None,
                          *norm_weights: torch.Tensor) -> bool:
    """Whether `attend_decode` can take this attention step: one token per row, float32 cache buffers
    (n_layers, B, Hkv, max_len, D) with room for slot `start`, and a mask that is None or a boolean
    (B or 1, 1, 1, start + 1); plus `usable` on every tensor."""
    if q.dim() != 4 or q.shape[1] != 1 or cache_k.dim() != 5 or start + 1 > cache_k.shape[3]:
        return False
    B, _, Hq, D = q.shape
    Hkv = k.shape[2]
    if D % 2 or Hkv == 0 or Hq % Hkv or cos.shape[-1] != D // 2 or cos.shape[0] not in (1, B) or cos.dim() != 3:
        return False
    if mask is not None and (mask.dtype != torch.bool or mask.shape[1:] != (1, 1, start + 1)
                             or mask.shape[0] not in (1, B) or not mask.is_contiguous()):
        return False
    if cache_k.shape != cache_v.shape or cache_k.shape[1:3] != (B, Hkv) or cache_k.shape[4] != D:
        return False
    return usable(q, k, v, cos, sin, cache_k, cache_v, *norm_weights)


def attend_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  cache_k: torch.Tensor, cache_v: torch.Tensor, layer: int, start: int, mask: torch.Tensor | None, *, layout: int, scale: float | None = None,
                  q_norm: tuple[torch.Tensor, float] | None = None, k_norm: tuple[torch.Tensor, float] | None = None,
                  plus_one: bool = False) -> torch.Tensor:
    """One token's attention for one layer, when `attend_decode_applies`: (B, 1, Hq * D) attention outputs.

    q (B, 1, Hq, D), k and v (B, 1, Hkv, D) are the new token's projections. Optionally q and k are first
    RMS-normalised per head (`q_norm` / `k_norm`: weight and eps; `plus_one` scales by 1 + weight), then rotated
    by cos/sin (B or 1, 1, D/2) in `layout`; the rotated key and the value are written into the cache buffers at slot
    `start` of `layer`, and the query attends to slots [0, start] (less those `mask` hides) with scores
    `scale` * q.k (default D ** -0.5, as torch's sdpa).
    """
    B, _, Hq, D = q.shape
    Hkv = k.shape[2]
    if (q_norm is None) != (k_norm is None):
        raise ValueError("q_norm and k_norm go together")
    qw, q_eps = q_norm if q_norm is not None else (None, 0.0)
    kw, k_eps = k_norm if k_norm is not None else (None, 0.0)
    kc, vc = cache_k, cache_v
    max_len = kc.shape[3]
    layer_bytes = kc.stride(0) * kc.element_size()  # cache tensors are (n_layers, B, Hkv, max_len, D)
    out = torch.empty(B, 1, Hq * D, dtype=torch.float32)
    rc = _fn("lh_ops_attend_decode")(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), B, Hq, Hkv, D,
        q_norm is not None, None if qw is None else qw.data_ptr(), None if kw is None else kw.data_ptr(),
        _ONE_PLUS_WEIGHT if plus_one else _WEIGHT, q_eps, k_eps,
        cos.data_ptr(), sin.data_ptr(), 0 if cos.shape[0] == 1 else D // 2, layout,
        kc.data_ptr() + layer * layer_bytes, vc.data_ptr() + layer * layer_bytes, max_len, start,
        None if mask is None else mask.data_ptr(), 0 if mask is None or mask.shape[0] == 1 else start + 1,
        D**-0.5 if scale is None else scale, out.data_ptr(), torch.get_num_threads(),
    )
    if rc != 0:
        raise MemoryError("native attention could not allocate its scratch")
    return out
