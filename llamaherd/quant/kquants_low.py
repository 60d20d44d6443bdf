"""Q3_K, IQ4_XS and IQ4_NL block quantizers: float rows -> GGUF bytes + reconstruction, with or without importance.

Q3_K follows llama.cpp `ggml/src/ggml-quants.c` `quantize_row_q3_K_ref` (no importance weights: make_q3_quants
per 16-element sub-block, 6-bit scales against the super-block's fp16 d) and `quantize_row_q3_K_impl` (with them,
as `quantize_q3_K` calls it: make_qx_quants with weights qw * sqrt(sigma2 + x^2), the scales themselves fitted
by make_qx_quants weighted by each sub-block's summed weight). IQ4_XS and IQ4_NL follow `quantize_iq4_xs` /
`quantize_iq4_nl` -> `quantize_row_iq4_nl_impl` (ntry 7): per 32-element block a scale for the non-linear code
book `kvalues_iq4nl`, the best of 16 candidate grids by weighted error (weights x^2 without an importance
matrix); IQ4_XS then stores the eight block scales as 6-bit multiples of one fp16 d and re-picks every index
with the rounded scale. Same contract as quant/quantize.py: (bytes, values they decode to), vectorised over blocks.
"""

from __future__ import annotations

import torch

from ..gguf_file import QK_K
from .ggml_quants import IQ4_NL_VALUES
from .searches import (GROUP_MAX_EPS, as_u8, best_index, fp16_bytes, fp16_round, make_q3_quants, make_qx_quants,
                       safe_div, safe_inv, signed_absmax)

_IQ4 = torch.tensor(IQ4_NL_VALUES, dtype=torch.int32)  # ggml-common.h kvalues_iq4nl, sorted
_IQ4_F = _IQ4.to(torch.float32)
NTRY = 7  # quantize_iq4_xs / quantize_iq4_nl pass ntry 7, with or without importance weights


def _sigma_weights(x: torch.Tensor, qw: torch.Tensor, block: int) -> torch.Tensor:
    """qw * sqrt(sigma2 + x^2), sigma2 = 2 * mean(x^2) over each `block` elements (the `_impl`s' weights)."""
    xs = x.view(-1, block)
    sigma2 = (xs * xs).sum(-1, keepdim=True) * (2 / block)
    return qw.view(-1, block) * torch.sqrt(sigma2 + xs * xs)


# ---- Q3_K -------------------------------------------------------------------------------------------------
def q3_k(x: torch.Tensor, qw: torch.Tensor | None = None, n_per_row: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    sb = x.view(-1, 16)  # 16 sub-blocks of 16 per super-block
    if qw is None:  # quantize_row_q3_K_ref
        scales, L = make_q3_quants(sb, 4)
        scales = scales.view(-1, 16)
        max_scale = signed_absmax(scales)
        nz = max_scale != 0
        iscale = -32 / torch.where(nz, max_scale, torch.ones_like(max_scale))
        ls = (torch.round(iscale[:, None] * scales).clamp(-32, 31) + 32) * nz[:, None]
        d = torch.where(nz, 1 / iscale, torch.zeros_like(iscale))
    else:  # quantize_row_q3_K_impl
        w = _sigma_weights(x, qw, QK_K).view(-1, 16)
        scales, L = make_qx_quants(sb, 4, w)
        d, ls = make_qx_quants(scales.view(-1, 16), 32, w.sum(-1).view(-1, 16))
    dj = (fp16_round(d)[:, None] * (ls - 32)).reshape(-1)  # (nb*16,)
    nz = dj != 0  # the C code keeps the search's levels where a sub-block's scale is zero
    Lr = torch.round(sb / torch.where(nz, dj, torch.ones_like(dj))[:, None]).clamp(-4, 3) + 4
    L = torch.where(nz[:, None], Lr, L)
    recon = dj[:, None] * (L - 4)
    return _pack_q3_k(L.view(-1, QK_K).to(torch.int64), ls.to(torch.int64), d), recon


def _pack_q3_k(L: torch.Tensor, ls: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """block_q3_K: hmask[32] (bit k of byte m: the third bit of element 32k + m), qs[64] (2-bit fields: byte
    32h + l holds elements 128h + l + 32s at bits 2s), scales[12] (low nibbles of scales 0-7 and 8-15 in bytes
    0-7, the top two bits of scale j at bits 2(j // 4) of byte 8 + j % 4), fp16 d."""
    high = (L > 3).to(torch.int64)
    low = L - 4 * high
    shifts = torch.arange(8, dtype=torch.int64)
    hmask = (high.view(-1, 8, 32) << shifts[:, None]).sum(1)
    qs = (low.view(-1, 2, 4, 32) << (2 * shifts[:4])[:, None]).sum(2).reshape(-1, 64)
    sc = torch.cat([(ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4),
                    ((ls.view(-1, 4, 4) >> 4) << (2 * shifts[:4])[:, None]).sum(1)], dim=1)
    return torch.cat([as_u8(hmask), as_u8(qs), as_u8(sc), fp16_bytes(d)], dim=1)  # (nb, 110)


# ---- IQ4_XS / IQ4_NL --------------------------------------------------------------------------------------
def _iq4_block_scales(xb: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The scale of each 32-element row of xb for the IQ4_NL code book (quantize_row_iq4_nl_impl's block loop):
    the least-squares scale of the indices picked at d = max/127, then of those picked at iscale (-127 + t)/max
    for t in -7..7, keeping the one of least weighted error; 0 for an all-zero block."""
    mx = signed_absmax(xb)
    zero = mx.abs() < GROUP_MAX_EPS
    mxs = torch.where(zero, torch.ones_like(mx), mx)

    def fit(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = _IQ4_F[best_index(_IQ4, iscale[:, None] * xb)]
        wq = w * q
        return (wq * xb).sum(-1), (wq * q).sum(-1)

    sumqx, sumq2 = fit(1 / (-mxs / _IQ4_F[0]))
    d = safe_div(sumqx, sumq2)
    best = d * sumqx
    for t in range(-NTRY, NTRY + 1):
        sumqx, sumq2 = fit((t + IQ4_NL_VALUES[0]) / mxs)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = torch.where(better, safe_div(sumqx, sumq2), d)
        best = torch.where(better, d * sumqx, best)
    return torch.where(zero, torch.zeros_like(d), d)


def _iq4_weights(x: torch.Tensor, qw: torch.Tensor | None, block: int) -> torch.Tensor:
    return (x * x).view(-1, 32) if qw is None else _sigma_weights(x, qw, block).view(-1, 32)


def _pack_nibbles(idx: torch.Tensor) -> torch.Tensor:
    """(n, 32k) indices -> (n, 16k) bytes: per 32 elements, element j low nibble and j + 16 high nibble."""
    v = as_u8(idx).view(idx.shape[0], -1, 2, 16)
    return (v[:, :, 0] | (v[:, :, 1] << 4)).reshape(idx.shape[0], -1)


def iq4_xs(x: torch.Tensor, qw: torch.Tensor | None = None, n_per_row: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    xb = x.view(-1, 32)
    scales = _iq4_block_scales(xb, _iq4_weights(x, qw, QK_K)).view(-1, 8)
    d = -signed_absmax(scales) / 32  # -0.0 for an all-zero super-block, stored as such
    l = torch.round(safe_inv(d)[:, None] * scales).clamp(-32, 31)  # (nb, 8)
    dl = (d[:, None] * l).reshape(-1)  # the unrounded d picks the indices, as in the C code
    idx = best_index(_IQ4, safe_inv(dl)[:, None] * xb)  # (nb*8, 32)
    recon = (fp16_round(d)[:, None] * l).reshape(-1, 1) * _IQ4_F[idx]
    li = (l + 32).to(torch.int64)
    scales_l = (li[:, 0::2] & 0xF) | ((li[:, 1::2] & 0xF) << 4)  # (nb, 4)
    scales_h = ((li >> 4) << (2 * torch.arange(8, dtype=torch.int64))).sum(1)  # a little-endian uint16
    raw = torch.cat([fp16_bytes(d), as_u8(scales_h & 0xFF)[:, None], as_u8(scales_h >> 8)[:, None], as_u8(scales_l),
                     _pack_nibbles(idx.view(-1, QK_K))], dim=1)  # (nb, 136)
    return raw, recon


def iq4_nl(x: torch.Tensor, qw: torch.Tensor | None = None, n_per_row: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    xb = x.view(-1, 32)
    d = _iq4_block_scales(xb, _iq4_weights(x, qw, 32))
    idx = best_index(_IQ4, safe_inv(d)[:, None] * xb)  # re-picked with the unrounded scale (ntry > 0)
    recon = fp16_round(d)[:, None] * _IQ4_F[idx]
    return torch.cat([fp16_bytes(d), _pack_nibbles(idx)], dim=1), recon  # (nb, 18)
