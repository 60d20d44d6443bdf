"""Rotary position embeddings: inverse frequencies, Llama 3.1 / linear scaling, and their application."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import RopeScaling


def inv_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """Per-pair inverse frequencies, float32, shape (head_dim // 2,).

    Matches llama-models `precompute_freqs_cis`: theta ** -(2i / head_dim), then the optional scaling.
    """
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    if scaling is None:
        return freqs
    if scaling.kind == "linear":
        return freqs / scaling.factor
    return _llama3_scaling(freqs, scaling)


class Frequencies:
    """A model's inverse frequencies, computed on first use on the input's device and kept there.

    Not a buffer: models are built on the meta device and loaded by assignment, which leaves non-persistent
    buffers unmaterialised; computing on first use sidesteps that.
    """

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling | None = None) -> None:
        self._args = (head_dim, theta, scaling)
        self._table: torch.Tensor | None = None

    def on(self, device: torch.device) -> torch.Tensor:
        if self._table is None or self._table.device != device:
            self._table = inv_frequencies(*self._args).to(device)
        return self._table


def default_positions(tokens: torch.Tensor, start: int) -> torch.Tensor:
    """Positions start, start+1, ... for every row of tokens (B, T): a batch that shares one timeline."""
    B, T = tokens.shape
    return torch.arange(start, start + T, device=tokens.device)[None].expand(B, T)


def _llama3_scaling(freqs: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1 frequency scaling (llama-models `llama3/model.py::apply_scaling`).

    Wavelengths shorter than original/high_freq_factor are kept, longer than original/low_freq_factor are
    divided by `factor`, and the band between is interpolated smoothly.
    """
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / freqs
    scaled = torch.where(wavelen > low_wavelen, freqs / s.factor, freqs)
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(mid, (1 - smooth) * scaled / s.factor + smooth * scaled, scaled)


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency, float32, shape (*positions.shape, head_dim // 2)."""
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x: (B, T, H, D) by angles cos/sin: (B or 1, T, D/2).

    This is Meta's interleaved layout (complex multiplication on adjacent pairs), computed in float32.
    """
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, H, D/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(-2).type_as(x)


class Rotary(nn.Module):
    """`apply_rope` as a module (no parameters), so that a post-load swap can replace it."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rope(x, cos, sin)
