"""The float helpers and scale searches of ggml-quants.c that the block quantizers share, vectorised over rows.

`make_qx_quants`, `make_qkx2_quants` (also `make_qkx3_quants` with weights given), `make_qp_quants` and
`make_q3_quants` follow the C functions of those names in llama.cpp `ggml/src/ggml-quants.c`, in float32 with
round-half-to-even (`nearest_int`) as there; each works on a (rows, n) tensor and decides per row.
"""

from __future__ import annotations

import numpy as np
import torch

GROUP_MAX_EPS = 1e-15  # ggml-quants.c: a group whose largest |x| is below this is all zero

# ---- helpers ----------------------------------------------------------------------------------------------
def fp16_round(x: torch.Tensor) -> torch.Tensor:
    """Round to fp16 and back: the value a GGUF block's fp16 scale field holds."""
    return x.to(torch.float16).to(torch.float32)


def fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """(N,) float -> (N, 2) little-endian fp16 bytes."""
    return x.to(torch.float16).contiguous().view(torch.uint8).view(-1, 2)


def round_away(x: torch.Tensor) -> torch.Tensor:
    """C roundf: halves away from zero (Q8_0 uses roundf; the k-quants' nearest_int rounds halves to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """Per row, the value with the largest magnitude, sign kept (first one on ties, as the C loops)."""
    idx = x.abs().argmax(dim=-1, keepdim=True)
    return x.gather(-1, idx).squeeze(-1)


def safe_div(a: torch.Tensor | float, d: torch.Tensor) -> torch.Tensor:
    """a / d where d != 0, else 0 (the C code's `d ? a/d : 0`), dividing as C does rather than via 1/d."""
    ok = d != 0
    return torch.where(ok, a / torch.where(ok, d, torch.ones_like(d)), torch.zeros_like(d))


def safe_inv(d: torch.Tensor) -> torch.Tensor:
    return safe_div(1.0, d)


def as_u8(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.int32).to(torch.uint8)


# ---- k-quant searches ---------------------------------------------------------------------------------------
def make_qkx2_quants(x, w, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Scale and min for asymmetric levels 0..nmax of each row of x (ggml-quants.c `make_qkx2_quants`).

    Start from the min/max grid, then try `nstep+1` stretched grids and keep the weighted least-squares
    (scale, min) fit with the smallest weighted squared error. The C code updates `min` as it improves and
    later grids are anchored at the improved min; this keeps that sequential dependence per row.
    Returns (scale, the_min = -min >= 0, levels) with x ~ scale * L - the_min.
    """
    mn = x.amin(-1).clamp(max=0)
    mx = x.amax(-1)
    sum_w = w.sum(-1)
    sum_x = (w * x).sum(-1)
    flat = mx == mn
    span = torch.where(flat, torch.ones_like(mx), mx - mn)
    iscale = nmax / span
    scale = 1 / iscale
    L = torch.round(iscale[:, None] * (x - mn[:, None])).clamp(0, nmax)
    best = (w * (scale[:, None] * L + mn[:, None] - x) ** 2).sum(-1)
    wx = w * x
    sum_x2 = (wx * x).sum(-1)
    for step in range(nstep + 1):
        span = torch.where(flat, torch.ones_like(mx), mx - mn)
        iscale = float(np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax)) / span
        la = torch.round((x - mn[:, None]).mul_(iscale[:, None])).clamp_(0, nmax)
        wl = w * la
        sum_l = wl.sum(-1)
        sum_l2 = (wl * la).sum(-1)
        sum_xl = (wx * la).sum(-1)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = torch.where(ok, D, torch.ones_like(D))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0  # a positive offset is not representable: refit the scale through zero
        this_scale = torch.where(pos, sum_xl / torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2)), this_scale)
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        # sum w (s l + m - x)^2 expanded into the sums at hand: no further pass over the elements
        s, m = this_scale, this_min
        err = (s * s * sum_l2 + 2 * s * m * sum_l - 2 * s * sum_xl + m * m * sum_w - 2 * m * sum_x + sum_x2)
        better = ok & (err < best) & ~flat
        L = torch.where(better[:, None], la, L)
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    L = torch.where(flat[:, None], torch.zeros_like(L), L)
    return scale, -mn, L


def make_qx_quants(x, nmax: int, qw: torch.Tensor | None = None):
    """Scale for symmetric levels -nmax..nmax-1 of each row (ggml-quants.c `make_qx_quants`, rmse_type 1).

    Weights are `qw` (importance weights, same shape as x) or x^2; grids iscale = -(nmax + 0.1 is)/max for
    is in -9..9 are tried and the one maximising sumlx^2/suml2 (least weighted error) is kept.
    Returns (scale, levels shifted by +nmax).
    """
    mx = signed_absmax(x)
    zero = mx.abs() < GROUP_MAX_EPS
    mxs = torch.where(zero, torch.ones_like(mx), mx)
    w = x * x if qw is None else qw

    def fit(iscale):
        l = torch.round(iscale[:, None] * x).clamp(-nmax, nmax - 1)
        return l, (w * x * l).sum(-1), (w * l * l).sum(-1)

    L, sumlx, suml2 = fit(-nmax / mxs)
    scale = safe_div(sumlx, suml2)  # suml2 >= 0
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        l, sumlx, suml2 = fit(-float(np.float32(nmax) + np.float32(0.1) * np.float32(step)) / mxs)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = torch.where(better[:, None], l, L)
        new_scale = sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2))
        scale = torch.where(better, new_scale, scale)
        best = torch.where(better, new_scale * sumlx, best)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    L = torch.where(zero[:, None], torch.zeros_like(L), L + nmax)
    return scale, L


def make_qp_quants(x: torch.Tensor, nmax: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and levels 0..nmax for non-negative rows of x, least w-weighted error (ggml-quants.c `make_qp_quants`).

    Grids nmax + 0.1 is (is in -4..4) over max(x) are tried, then up to five passes move single levels while
    that improves sumlx^2 / suml2. Returns (scale = sumlx / suml2, levels).
    """
    mx = x.amax(-1).clamp(min=0)
    zero = mx == 0
    mxs = torch.where(zero, torch.ones_like(mx), mx)
    iscale = nmax / mxs
    L = torch.round(iscale[:, None] * x)
    best = (w * (x - (1 / iscale)[:, None] * L) ** 2).sum(-1)
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        iscale_is = float(np.float32(0.1) * np.float32(step) + np.float32(nmax)) / mxs
        l = torch.round(iscale_is[:, None] * x).clamp(max=nmax)
        mse = (w * (x - (1 / iscale_is)[:, None] * l) ** 2).sum(-1)
        better = mse < best
        best = torch.where(better, mse, best)
        iscale = torch.where(better, iscale_is, iscale)
    L = torch.round(iscale[:, None] * x).clamp(0, nmax)  # C stores uint8: a negative scale cannot occur here
    sumlx, suml2 = (w * x * L).sum(-1), (w * L * L).sum(-1)
    for _ in range(5):  # the C loop per row stops when a pass changes nothing; a further pass changes nothing too
        changed = torch.zeros_like(zero)
        for i in range(x.shape[1]):
            wi, xi, li = w[:, i], x[:, i], L[:, i]
            slx, sl2 = sumlx - wi * xi * li, suml2 - wi * li * li
            ok = (slx > 0) & (sl2 > 0)
            new_l = torch.round(xi * sl2 / torch.where(ok, slx, torch.ones_like(slx))).clamp(0, nmax)
            slx, sl2 = slx + wi * xi * new_l, sl2 + wi * new_l * new_l
            take = ok & (new_l != li) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[:, i] = torch.where(take, new_l, li)
            sumlx, suml2 = torch.where(take, slx, sumlx), torch.where(take, sl2, suml2)
            changed |= take
        if not changed.any():
            break
    scale = torch.where(zero | (suml2 <= 0), torch.zeros_like(mx), sumlx / torch.where(suml2 > 0, suml2, 1.0))
    return scale, torch.where(zero[:, None], torch.zeros_like(L), L)




def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and levels -nmax..nmax-1 of each row, weights x^2 (ggml-quants.c `make_q3_quants`, do_rmse true).

    Levels from the grid -nmax/max, then up to five passes move single levels to the least-squares optimum
    while that raises sumlx^2 / suml2. Returns (scale = sumlx / suml2, levels shifted by +nmax; all-zero
    rows: scale 0 and levels 0, as the C code leaves them).
    """
    mx = signed_absmax(x)
    zero = mx.abs() < GROUP_MAX_EPS
    L = torch.round(-nmax / torch.where(zero, torch.ones_like(mx), mx)[:, None] * x).clamp(-nmax, nmax - 1)
    w = x * x
    sumlx, suml2 = torch.zeros_like(mx), torch.zeros_like(mx)
    for i in range(x.shape[1]):  # in the C loop's order: the passes below compare sums that nearly tie
        sumlx, suml2 = sumlx + w[:, i] * x[:, i] * L[:, i], suml2 + w[:, i] * L[:, i] * L[:, i]
    for _ in range(5):  # as make_qp_quants: a pass that changes nothing in a row changes nothing there again
        changed = torch.zeros_like(zero)
        for i in range(x.shape[1]):
            wi, xi, li = w[:, i], x[:, i], L[:, i]
            slx, sl2 = sumlx - wi * xi * li, suml2 - wi * li * li
            ok = slx > 0
            new_l = torch.round(xi * sl2 / torch.where(ok, slx, torch.ones_like(slx))).clamp(-nmax, nmax - 1)
            slx, sl2 = slx + wi * xi * new_l, sl2 + wi * new_l * new_l
            take = ok & (new_l != li) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[:, i] = torch.where(take, new_l, li)
            sumlx, suml2 = torch.where(take, slx, sumlx), torch.where(take, sl2, suml2)
            changed |= take
        if not changed.any():
            break
    scale = torch.where(zero, torch.zeros_like(sumlx), safe_div(sumlx, suml2))  # suml2 >= 0
    return scale, torch.where(zero[:, None], torch.zeros_like(L), L + nmax)


def best_index(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the sorted integer code book `values` to each x, halfway cases going up
    (ggml-quants.c `best_index_int8`: level i is taken once 2x reaches values[i-1] + values[i]).

    The midpoint sums are integers, so 2x >= sum exactly when floor(2x) >= sum: one table lookup per element.
    """
    edges = values[:-1] + values[1:]
    lo, hi = int(edges[0]) - 1, int(edges[-1])
    table = torch.searchsorted(edges, torch.arange(lo, hi + 1, dtype=edges.dtype), right=True)
    return table[(x + x).floor_().clamp_(lo, hi).long() - lo]
