"""ggml dequantization: vectorised torch decoders of every supported block type (the types are in gguf_file).

Layouts follow llama.cpp `ggml/src/ggml-common.h` (block_q4_0 ... block_q6_K, block_iq4_xs) and the reference
decoders `dequantize_row_*` in `ggml/src/ggml-quants.c`; gguf-py's `gguf/quants.py` decodes the same bytes in
numpy and is the oracle of our tests. Every decoder here works on a (n_blocks, type_size) uint8 tensor and
returns (n_blocks, block_size) float32, doing its float arithmetic in the same order as the reference so that
results agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..gguf_file import FLOAT_DTYPES, QK_K, GGMLType, ggml_type

K_SCALE_SIZE = 12  # packed 6-bit scales + mins of Q4_K / Q5_K

# IQ4_NL's non-linear 4-bit code book (ggml-common.h `kvalues_iq4nl`).
IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


# ---- helpers -------------------------------------------------------------------------------------


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 stored at byte `at` of each block, as float32 (n_blocks, 1)."""
    return blocks[:, at : at + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, groups: int) -> torch.Tensor:
    """Split (n, groups * L) packed bytes into (n, groups, 2, L): low nibbles first, then high nibbles."""
    q = qs.reshape(qs.shape[0], groups, 1, -1)
    # Full-size ops rather than one broadcast shift: torch vectorises these far better (2x on Q5_0).
    return torch.cat([q & 0x0F, q >> 4], dim=2)


def _crumbs(qs: torch.Tensor, groups: int) -> torch.Tensor:
    """Split (n, groups * L) bytes into (n, groups, 4, L) 2-bit fields, lowest bits first."""
    q = qs.reshape(qs.shape[0], groups, 1, -1)
    return torch.cat([q & 3, (q >> 2) & 3, (q >> 4) & 3, q >> 6], dim=2)


# BITS[b, j] = bit j of byte b: one table lookup unpacks 8 bits.
_BITS = ((torch.arange(256)[:, None] >> torch.arange(8)[None]) & 1).to(torch.uint8)


def _bits(packed: torch.Tensor, count: int = 8) -> torch.Tensor:
    """Bit j of every byte of (n, L) -> (n, count, L) uint8 in {0, 1}, for j < count."""
    return _BITS[packed.long(), :count].transpose(1, 2)


# ---- 32-element block types ----------------------------------------------------------------------


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    # block_q4_0: f16 d, 16 bytes of nibbles; element j = low nibble j, element j+16 = high nibble j.
    d = _f16(b, 0)
    q = _nibbles(b[:, 2:], 1).reshape(b.shape[0], 32).view(torch.int8) - 8
    return d * q.float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    # block_q4_1: f16 d, f16 m, 16 bytes of nibbles; x = d * q + m.
    d, m = _f16(b, 0), _f16(b, 2)
    q = _nibbles(b[:, 4:], 1).reshape(b.shape[0], 32).float()
    return d * q + m


def _q5_high(qh: torch.Tensor) -> torch.Tensor:
    # 32 fifth bits in a little-endian uint32: bit j belongs to element j.
    return _BITS[qh.long()].reshape(qh.shape[0], 32)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    # block_q5_0: f16 d, u32 qh (fifth bits), 16 bytes of low nibbles; q in [0, 32) centred by -16.
    d = _f16(b, 0)
    low = _nibbles(b[:, 6:], 1).reshape(b.shape[0], 32)
    q = (low | (_q5_high(b[:, 2:6]) << 4)).view(torch.int8) - 16
    return d * q.float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    # block_q5_1: f16 d, f16 m, u32 qh, 16 bytes of low nibbles; x = d * q + m.
    d, m = _f16(b, 0), _f16(b, 2)
    low = _nibbles(b[:, 8:], 1).reshape(b.shape[0], 32)
    q = (low | (_q5_high(b[:, 4:8]) << 4)).float()
    return d * q + m


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    # block_q8_0: f16 d, 32 int8.
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b, 0)


def _iq4_nl(b: torch.Tensor) -> torch.Tensor:
    # block_iq4_nl: f16 d, 16 bytes of nibbles indexing the IQ4_NL code book.
    d = _f16(b, 0)
    idx = _nibbles(b[:, 2:], 1).reshape(b.shape[0], 32).long()
    return d * torch.tensor(IQ4_NL_VALUES, dtype=torch.int8)[idx].float()


# ---- k-quants (256-element super-blocks) ---------------------------------------------------------


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    # block_q2_K: 16 bytes scales (low nibble scale, high nibble min), 64 bytes 2-bit quants, f16 d, f16 dmin.
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (d * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = _crumbs(qs, 2).reshape(n, 16, 16).float()  # (n, 2, 4, 32) -> 16 sub-blocks of 16
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    # block_q3_K: 32 bytes hmask (third bit, inverted), 64 bytes 2-bit quants, 12 bytes 6-bit scales, f16 d.
    n = b.shape[0]
    hmask, qs, sc = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16(b, 108)
    # 16 6-bit scales: low 4 bits in bytes 0-7 (nibbles), high 2 bits in bytes 8-11 (2-bit fields).
    low = _nibbles(sc[:, :8], 1).reshape(n, 16)
    high = _crumbs(sc[:, 8:], 1).reshape(n, 16)
    scales = ((low | (high << 4)).view(torch.int8) - 32).float()
    dl = (d * scales).reshape(n, 16, 1)
    ql = _crumbs(qs, 2).reshape(n, 16, 16)
    qh = _bits(hmask, 8).reshape(n, 16, 16) ^ 1  # a set mask bit means "no -4 offset"
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


def _scale_min_k4(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack Q4_K / Q5_K's 12 bytes into 8 six-bit scales and 8 six-bit mins (ggml `get_scale_min_k4`)."""
    n = sc.shape[0]
    s = sc.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]  # each (n, 4)
    scales = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mins = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return scales, mins


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    # block_q4_K: f16 d, f16 dmin, 12 bytes scales/mins, 128 bytes nibbles in 4 chunks of 64 elements.
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _scale_min_k4(b[:, 4:16])
    dl = (d * sc.float()).reshape(n, 8, 1)
    ml = (dmin * mn.float()).reshape(n, 8, 1)
    q = _nibbles(b[:, 16:], 4).reshape(n, 8, 32).float()  # (n, 4 chunks, 2 halves, 32) -> 8 sub-blocks
    return (dl * q - ml).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    # block_q5_K: f16 d, f16 dmin, 12 bytes scales/mins, 32 bytes qh (bit j of byte l: sub-block j), 128 nibbles.
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _scale_min_k4(b[:, 4:16])
    dl = (d * sc.float()).reshape(n, 8, 1)
    ml = (dmin * mn.float()).reshape(n, 8, 1)
    low = _nibbles(b[:, 48:], 4).reshape(n, 8, 32)
    high = _bits(b[:, 16:48], 8)  # (n, 8, 32)
    q = (low | (high << 4)).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    # block_q6_K: 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8 scales, f16 d; q centred by -32.
    n = b.shape[0]
    ql, qh, sc = b[:, :128], b[:, 128:192], b[:, 192:208]
    d = _f16(b, 208)
    dl = (d * sc.contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    low = _nibbles(ql, 2).reshape(n, 8, 32)  # (n, 2 halves of 128, 2 nibble planes, 64) -> (n, 8, 32)
    high = _crumbs(qh, 2).reshape(n, 8, 32)
    q = ((low | (high << 4)).view(torch.int8) - 32).reshape(n, 16, 16).float()
    return (dl * q).reshape(n, QK_K)


def _iq4_xs(b: torch.Tensor) -> torch.Tensor:
    # block_iq4_xs: f16 d, u16 scales_h (2 bits per sub-block), 4 bytes scales_l (nibbles), 128 bytes indices.
    n = b.shape[0]
    d = _f16(b, 0)
    sh = b[:, 2].to(torch.int32) | (b[:, 3].to(torch.int32) << 8)  # (n,)
    high = (sh[:, None] >> torch.arange(0, 16, 2, dtype=torch.int32)[None]) & 3  # (n, 8)
    low = torch.stack([b[:, 4:8] & 0x0F, b[:, 4:8] >> 4], dim=2).reshape(n, 8)  # byte j: sub-blocks 2j, 2j+1
    scales = ((low | (high.to(torch.uint8) << 4)).view(torch.int8) - 32).float()
    dl = (d * scales).reshape(n, 8, 1)
    idx = _nibbles(b[:, 8:], 8).reshape(n, 8, 32).long()
    return (dl * torch.tensor(IQ4_NL_VALUES, dtype=torch.int8)[idx].float()).reshape(n, QK_K)


# ---- the decoders by type -----------------------------------------------------------------------

DECODERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q8_0": _q8_0,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
    "IQ4_NL": _iq4_nl,
    "IQ4_XS": _iq4_xs,
}


def dequantize(packed: torch.Tensor, qtype: int | str | GGMLType, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode packed rows (..., row_bytes) uint8 into (..., n_cols) values of `dtype`.

    Float types are accepted too, as raw bytes, so that every type goes through one entry point.
    """
    t = ggml_type(qtype)
    if packed.dtype != torch.uint8:
        raise TypeError(f"dequantize expects packed uint8 bytes, got {packed.dtype}")
    lead, nbytes = tuple(packed.shape[:-1]), packed.shape[-1]
    if nbytes % t.type_size:
        raise ValueError(f"{t.name}: row of {nbytes} bytes is not a whole number of {t.type_size}-byte blocks")
    n_cols = nbytes // t.type_size * t.block_size
    if not t.quantized:
        out = packed.contiguous().view(FLOAT_DTYPES[t.name])
    else:
        blocks = packed.reshape(-1, t.type_size)  # (n_blocks, type_size)
        out = DECODERS[t.name](blocks)  # (n_blocks, block_size) float32
    return out.reshape(*lead, n_cols).to(dtype)
