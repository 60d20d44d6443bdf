"""GGML block quantizers: float rows -> GGUF bytes + reconstruction (Q3_K and the IQ4 types in kquants_low.py).

Each quantizer follows llama.cpp's reference row quantizer in `ggml/src/ggml-quants.c` (the `*_ref` functions
that `llama_model_quantize` uses when no importance matrix is given), vectorised over blocks with torch in
float32. It returns the packed bytes exactly as GGUF stores them and the float values those bytes decode to,
computed here from the integer levels and fp16 scales (not by decoding the bytes), so a reference decoder
(gguf-py, llama.cpp) reproducing them checks our bit layout.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from ..gguf_file import QK_K
from .kquants_low import iq4_nl, iq4_xs, q3_k
from .searches import (GROUP_MAX_EPS, as_u8, fp16_bytes, fp16_round, make_qkx2_quants, make_qp_quants, make_qx_quants,
                       round_away, safe_div, safe_inv, signed_absmax)

CHUNK_ELEMS = 1 << 18  # elements quantized per step; bounds the temporaries of the k-quant searches


def block_shape(qtype: Q) -> tuple[int, int]:
    """(elements per block, bytes per block) of a GGML type."""
    return GGML_QUANT_SIZES[qtype]


def nbytes(qtype: Q, shape: tuple[int, ...]) -> int:
    n = int(np.prod(shape))
    elems, size = block_shape(qtype)
    return n // elems * size


# ---- legacy 32-element blocks -------------------------------------------------------------------------------
def _q8_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # quantize_row_q8_0_ref: d = amax/127, q = roundf(x/d)
    b = x.view(-1, 32)
    d = b.abs().amax(-1) / 127
    q = round_away(b * safe_inv(d)[:, None])
    recon = q * fp16_round(d)[:, None]
    raw = torch.cat([fp16_bytes(d), q.to(torch.int8).view(torch.uint8)], dim=1)  # (nb, 34)
    return raw, recon


def _row_weights(x: torch.Tensor, qw: torch.Tensor, n_per_row: int) -> torch.Tensor:
    """Importance weights of the 32-element types: qw * sqrt(sigma2 + x^2), sigma2 = mean(x^2) over the row
    (ggml-quants.c quantize_row_q4_0_impl / q5_0 / q5_1). Returns (n_blocks, 32)."""
    rows = x.view(-1, n_per_row)
    sigma2 = (rows * rows).sum(-1, keepdim=True) / n_per_row
    return (qw.view(-1, n_per_row) * torch.sqrt(sigma2 + rows * rows)).view(-1, 32)


def _q4_0(x: torch.Tensor, qw: torch.Tensor | None = None, n_per_row: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    # quantize_row_q4_0_ref: d = max/-8 (max keeps its sign), q = min(15, (int8)(x/d + 8.5));
    # with importance weights quantize_row_q4_0_impl: d from make_qx_quants(nmax 8) on the weighted error
    b = x.view(-1, 32)
    if qw is not None:
        d, q = make_qx_quants(b, 8, _row_weights(x, qw, n_per_row))
    else:
        d = signed_absmax(b) / -8
        q = torch.trunc(b * safe_inv(d)[:, None] + 8.5).clamp(max=15)
    recon = (q - 8) * fp16_round(d)[:, None]
    qu = as_u8(q)
    qs = qu[:, :16] | (qu[:, 16:] << 4)  # element j in the low nibble, j+16 in the high one
    return torch.cat([fp16_bytes(d), qs], dim=1), recon  # (nb, 18)


def _qh_bits(q: torch.Tensor) -> torch.Tensor:
    """Bit 4 of 32 five-bit levels packed into a little-endian uint32: (nb, 32) -> (nb, 4) bytes."""
    bits = ((q.to(torch.int64) >> 4) & 1) << torch.arange(32, dtype=torch.int64)
    return bits.sum(-1, dtype=torch.int64).to(torch.int32).view(torch.uint8).view(-1, 4)


def _q5_0(x: torch.Tensor, qw: torch.Tensor | None = None, n_per_row: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    # quantize_row_q5_0_ref: d = max/-16, q = min(31, (int8)(x/d + 16.5)); bit 4 of each level goes to qh;
    # with importance weights quantize_row_q5_0_impl: make_qx_quants(nmax 16) on the weighted error
    b = x.view(-1, 32)
    if qw is not None:
        d, q = make_qx_quants(b, 16, _row_weights(x, qw, n_per_row))
    else:
        d = signed_absmax(b) / -16
        q = torch.trunc(b * safe_inv(d)[:, None] + 16.5).clamp(max=31)
    recon = (q - 16) * fp16_round(d)[:, None]
    qu = as_u8(q) & 0x0F
    qs = qu[:, :16] | (qu[:, 16:] << 4)
    return torch.cat([fp16_bytes(d), _qh_bits(q), qs], dim=1), recon  # (nb, 22)


def _q5_1(x: torch.Tensor, qw: torch.Tensor | None = None, n_per_row: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    # quantize_row_q5_1_ref: d = (max-min)/31, m = min, q = (uint8)((x-min)/d + 0.5); with importance weights
    # quantize_row_q5_1_impl: make_qkx3_quants(nmax 31, rmin -0.9, rdelta 0.05, 36 steps), m = -the_min
    b = x.view(-1, 32)
    if qw is not None:
        d, neg_min, q = make_qkx2_quants(b, _row_weights(x, qw, n_per_row), 31, -0.9, 0.05, 36)
        mn = -neg_min
    else:
        mn, mx = b.amin(-1), b.amax(-1)
        d = (mx - mn) / 31
        q = torch.trunc((b - mn[:, None]) * safe_inv(d)[:, None] + 0.5).clamp(0, 31)
    recon = fp16_round(d)[:, None] * q + fp16_round(mn)[:, None]
    qu = as_u8(q) & 0x0F
    qs = qu[:, :16] | (qu[:, 16:] << 4)
    return torch.cat([fp16_bytes(d), fp16_bytes(mn), _qh_bits(q), qs], dim=1), recon  # (nb, 24)


# ---- k-quants ---------------------------------------------------------------------------------------------
def _pack_k4_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins into 12 bytes (ggml-quants.c q4_K layout, `get_scale_min_k4` inverse).

    Bytes 0-3: scales 0-3 with the top two bits of scales 4-7; bytes 4-7: mins 0-3 with the top bits of
    mins 4-7; bytes 8-11: low nibbles of scale j (low) and min j (high) for j = 4..7.
    """
    ls, lm = ls.to(torch.int32), lm.to(torch.int32)
    b0 = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    b1 = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    b2 = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return torch.cat([b0, b1, b2], dim=1).to(torch.uint8)  # (nb, 12)


def _k_asym(x: torch.Tensor, nmax: int, rmin: float, nstep: int, qw: torch.Tensor | None = None):
    """Shared body of Q4_K / Q5_K (quantize_row_q4_K_ref / quantize_row_q5_K_ref, or the `_impl`s with `qw`).

    Per 32-element sub-block: weights av_x + |x| with av_x the sub-block's rms, then make_qkx2_quants; the
    eight scales and mins are requantized to 6 bits against the super-block's fp16 d and dmin, and the levels
    recomputed with the rounded scales. With importance weights `qw` (one per element of x) llama.cpp's
    quantize_row_q4_K_impl is followed instead: weights qw * sqrt(sigma2 + x^2) with sigma2 = 2 * mean(x^2)
    over the super-block, the wider make_qkx3_quants search, and 6-bit scales and mins fitted by
    make_qp_quants weighted by each sub-block's summed weight. Returns (d, dmin, ls, lm, L, recon).
    """
    sb = x.view(-1, 32)  # (nb*8, 32)
    if qw is None:
        av_x = torch.sqrt((sb * sb).sum(-1) / 32)
        w = av_x[:, None] + sb.abs()
        scales, mins, L = make_qkx2_quants(sb, w, nmax, rmin, 0.1, nstep)
        scales, mins = scales.view(-1, 8), mins.view(-1, 8)
        max_scale = scales.amax(-1).clamp(min=0)
        max_min = mins.amax(-1).clamp(min=0)
        inv_scale = safe_div(63.0, max_scale)  # max_* >= 0 here, so "nonzero" is "positive" as in the C code
        inv_min = safe_div(63.0, max_min)
        ls = torch.round(inv_scale[:, None] * scales).clamp(max=63)
        lm = torch.round(inv_min[:, None] * mins).clamp(max=63)
        d, dmin = max_scale / 63, max_min / 63
    else:
        xs = x.view(-1, QK_K)
        sigma2 = 2 * (xs * xs).sum(-1) / QK_K
        w = (qw.view(-1, QK_K) * torch.sqrt(sigma2[:, None] + xs * xs)).view(-1, 32)
        # make_qkx3_quants with weights given is make_qkx2_quants's computation with rmin -0.9, rdelta 0.05, 36 steps
        scales, mins, L = make_qkx2_quants(sb, w, nmax, -0.9, 0.05, 36)
        sw = w.sum(-1).view(-1, 8)
        d, ls = make_qp_quants(scales.view(-1, 8), 63, sw)
        dmin, lm = make_qp_quants(mins.view(-1, 8), 63, sw)
    dj = (fp16_round(d)[:, None] * ls).reshape(-1)  # (nb*8,)
    mj = (fp16_round(dmin)[:, None] * lm).reshape(-1)
    nz = dj != 0  # the C code skips sub-blocks whose scale rounds to zero, keeping the search's levels
    Lr = torch.round((sb + mj[:, None]) / torch.where(nz, dj, torch.ones_like(dj))[:, None]).clamp(0, nmax)
    L = torch.where(nz[:, None], Lr, L)
    recon = dj[:, None] * L - mj[:, None]
    return d, dmin, ls, lm, L.view(-1, QK_K), recon


def _q4_k(x: torch.Tensor, qw: torch.Tensor | None = None, n_per_row: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    d, dmin, ls, lm, L, recon = _k_asym(x, 15, -1.0, 20, qw)  # quantize_row_q4_K_ref: nmax 15, rmin -1, 20 steps
    Lv = as_u8(L).view(-1, 4, 2, 32)  # (nb, 64-chunk, half, 32): low nibble first half, high nibble second
    qs = (Lv[:, :, 0] | (Lv[:, :, 1] << 4)).reshape(-1, 128)
    raw = torch.cat([fp16_bytes(d), fp16_bytes(dmin), _pack_k4_scales(ls, lm), qs], dim=1)  # (nb, 144)
    return raw, recon


def _q5_k(x: torch.Tensor, qw: torch.Tensor | None = None, n_per_row: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    d, dmin, ls, lm, L, recon = _k_asym(x, 31, -0.5, 15, qw)  # quantize_row_q5_K_ref: nmax 31, rmin -0.5, 15 steps
    Li = L.to(torch.int64)
    # qh[j] bit k = bit 4 of element 32k + j (sub-block k)
    qh = (((Li.view(-1, 8, 32) >> 4) & 1) << torch.arange(8, dtype=torch.int64)[:, None]).sum(1).to(torch.uint8)
    Lv = as_u8(Li & 0xF).view(-1, 4, 2, 32)
    qs = (Lv[:, :, 0] | (Lv[:, :, 1] << 4)).reshape(-1, 128)
    raw = torch.cat([fp16_bytes(d), fp16_bytes(dmin), _pack_k4_scales(ls, lm), qh, qs], dim=1)  # (nb, 176)
    return raw, recon


def _q6_k(x: torch.Tensor, qw: torch.Tensor | None = None, n_per_row: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    # quantize_row_q6_K_ref: 16 sub-blocks of 16 with make_qx_quants(nmax 32), int8 scales against fp16 d;
    # quantize_row_q6_K_impl passes the importance weights themselves to make_qx_quants
    sb = x.view(-1, 16)
    scales, L = make_qx_quants(sb, 32, None if qw is None else qw.view(-1, 16))
    scales = scales.view(-1, 16)
    max_scale = signed_absmax(scales)
    zero = max_scale.abs() < GROUP_MAX_EPS
    iscale = -128 / torch.where(zero, torch.ones_like(max_scale), max_scale)
    d = torch.where(zero, torch.zeros_like(max_scale), 1 / iscale)
    sc = torch.round(iscale[:, None] * scales).clamp(max=127)
    sc = torch.where(zero[:, None], torch.zeros_like(sc), sc)
    dj = (fp16_round(d)[:, None] * sc).reshape(-1)  # (nb*16,)
    nz = dj != 0
    Lr = torch.round(sb / torch.where(nz, dj, torch.ones_like(dj))[:, None]).clamp(-32, 31) + 32
    L = torch.where(nz[:, None], Lr, L)
    L = torch.where(zero.repeat_interleave(16)[:, None], torch.full_like(L, 32), L)  # zero block: all bytes 0
    recon = dj[:, None] * (L - 32)
    Li = L.to(torch.int64).view(-1, 2, 4, 32)  # (nb, 128-half, quarter, 32)
    ql = ((Li[:, :, 0:2] & 0xF) | ((Li[:, :, 2:4] & 0xF) << 4)).reshape(-1, 128).to(torch.uint8)
    qh = ((Li >> 4) << (2 * torch.arange(4, dtype=torch.int64))[:, None]).sum(2).reshape(-1, 64).to(torch.uint8)
    if zero.any():  # memset 0: levels 0 (not 32) in a zero block
        ql[zero], qh[zero] = 0, 0
    raw = torch.cat([ql, qh, sc.to(torch.int8).view(torch.uint8), fp16_bytes(d)], dim=1)  # (nb, 210)
    return raw, recon


QUANTIZERS: dict[Q, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {
    Q.Q8_0: _q8_0,
    Q.Q4_0: _q4_0,
    Q.Q5_0: _q5_0,
    Q.Q5_1: _q5_1,
    Q.Q4_K: _q4_k,
    Q.Q5_K: _q5_k,
    Q.Q6_K: _q6_k,
    Q.Q3_K: q3_k,
    Q.IQ4_XS: iq4_xs,
    Q.IQ4_NL: iq4_nl,
}


# Types whose quantizer takes importance weights (ggml-quants.c quantize_q4_0 ... quantize_q6_K with
# quant_weights); Q8_0 ignores them there too.
WEIGHTED = (Q.Q4_0, Q.Q5_0, Q.Q5_1, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_XS, Q.IQ4_NL)


def quantize(t: torch.Tensor, qtype: Q, imatrix: torch.Tensor | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """Quantize a float tensor whose last dimension is a multiple of the block size.

    `imatrix`: importance of each input column (the mean squared activation llama-imatrix collects), shape
    (row,) or, for a 3-D expert stack (E, rows, row), (E, row); used by the types in WEIGHTED, ignored by
    the others as llama.cpp does. Returns (bytes as a uint8 array of shape (*t.shape[:-1], row bytes),
    float32 reconstruction of t's shape). F32/F16 are plain casts.
    """
    shape = tuple(t.shape)
    x = t.detach().to(torch.float32).contiguous()
    if qtype == Q.F32:
        return x.numpy().copy(), x
    if qtype == Q.F16:
        h = x.to(torch.float16)
        return h.numpy().copy(), h.to(torch.float32)
    if qtype not in QUANTIZERS:
        raise ValueError(f"no quantizer for {qtype.name}; known: {[q.name for q in QUANTIZERS]}")
    elems, size = block_shape(qtype)
    if shape[-1] % elems:
        raise ValueError(f"row length {shape[-1]} is not a multiple of the {qtype.name} block size {elems}")
    fn = QUANTIZERS[qtype]
    if imatrix is not None and qtype in WEIGHTED:
        raw, recon = _quantize_weighted(x, fn, imatrix)
        return raw.numpy().reshape(*shape[:-1], shape[-1] // elems * size), recon.view(shape)
    flat = x.reshape(-1)
    step = max(elems, CHUNK_ELEMS // elems * elems)
    raws, recons = [], []
    for s in range(0, flat.numel(), step):
        raw, recon = fn(flat[s : s + step])
        raws.append(raw.reshape(-1))
        recons.append(recon.reshape(-1))
    raw = torch.cat(raws).numpy().reshape(*shape[:-1], shape[-1] // elems * size)
    return raw, torch.cat(recons).view(shape)


def _quantize_weighted(x: torch.Tensor, fn: Callable, imatrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole rows at a time, each matrix (expert) with its own importance row
    (llama-quant.cpp passes imatrix + i03 * n_per_row for matrix i03)."""
    n = x.shape[-1]
    if imatrix.numel() % n or imatrix.numel() == 0:
        raise ValueError(f"the importance matrix holds {imatrix.numel()} values, not rows of the tensor's {n} columns")
    mats = x.reshape(-1, *x.shape[-2:]) if x.dim() > 1 else x.reshape(1, 1, n)
    qw = imatrix.to(torch.float32).reshape(-1, n)
    if qw.shape[0] not in (1, mats.shape[0]):
        raise ValueError(f"the importance matrix has {qw.shape[0]} rows of {n}; "
                         f"the tensor has {mats.shape[0]} matrices")
    rows_per_step = max(1, CHUNK_ELEMS // n)
    raws, recons = [], []
    for e, mat in enumerate(mats):
        w = qw[e if qw.shape[0] > 1 else 0]
        for r in range(0, mat.shape[0], rows_per_step):
            part = mat[r : r + rows_per_step]
            raw, recon = fn(part.reshape(-1), w.repeat(part.shape[0]), n)
            raws.append(raw.reshape(-1))
            recons.append(recon.reshape(-1))
    return torch.cat(raws), torch.cat(recons)
