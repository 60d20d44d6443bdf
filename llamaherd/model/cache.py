"""A static key/value cache for the simple generation path: preallocated buffers, one verb `update`."""

from __future__ import annotations

import torch

from ..config import ModelConfig


class KVCache:
    """Per-layer key/value buffers of shape (n_layers, batch, n_kv_heads, max_len, head_dim).

    `length` counts the slots filled so far. A forward pass of T tokens writes slots
    [length, length + T) in every layer through `update`, then advances `length` by T.
    The cache knows nothing of positions or padding: slots are storage, positions are the caller's.
    """

    def __init__(
        self,
        n_layers: int,
        batch: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @classmethod
    def for_model(
        cls,
        config: ModelConfig,
        batch: int,
        max_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> KVCache:
        return cls(config.n_layers, batch, max_len, config.n_kv_heads, config.head_dim, dtype=dtype, device=device)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v: (B, n_kv_heads, T, head_dim) at slots [start, start+T); return all keys/values so far."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} slots needed, {self.max_len} allocated")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def grow(self, max_len: int) -> None:
        """Reallocate to `max_len` slots, keeping the filled ones (a generation whose length is not known ahead)."""
        if max_len <= self.max_len:
            return
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:3], max_len, old.shape[4])
            new[:, :, :, : self.length] = old[:, :, :, : self.length]
            setattr(self, name, new)

    def reset(self) -> None:
        self.length = 0
