"""The user-facing Model: a loaded network with its configuration, tokenizer and generation defaults."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .checkpoint.base import Checkpoint
from .config import GenerationDefaults, ModelConfig


class Model:
    """A loaded model. Build one with `llamaherd.load(source)`."""

    def __init__(self, net: nn.Module, checkpoint: Checkpoint) -> None:
        self.net = net
        self.checkpoint = checkpoint

    @property
    def config(self) -> ModelConfig:
        return self.checkpoint.config

    @property
    def tokenizer(self):
        return self.checkpoint.tokenizer

    @property
    def generation_defaults(self) -> GenerationDefaults:
        return self.checkpoint.generation

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.inference_mode()
    def logits(self, token_ids: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor) -> torch.Tensor:
        """Full forward from position 0 without a cache: float32 logits [..., T, vocab].

        A flat sequence gives (T, vocab); a batch of equal-length sequences gives (B, T, vocab).
        """
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device)
        flat = ids.dim() == 1
        out = self.net(ids[None] if flat else ids)
        return out[0] if flat else out

    def __repr__(self) -> str:
        c = self.config
        return f"Model(arch={c.arch!r}, dim={c.dim}, n_layers={c.n_layers}, source={str(self.checkpoint.source)!r})"
