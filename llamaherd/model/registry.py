"""Architecture name -> model class: the one place that maps ModelConfig.arch to code."""

from __future__ import annotations

import importlib

import torch
from torch import nn

from ..config import ConfigError, ModelConfig

# arch -> "module:Class", imported on demand so a family's file loads only when used.
ARCHITECTURES: dict[str, str] = {
    "llama": "llamaherd.model.llama:Transformer",
    "llama4": "llamaherd.model.llama4:Transformer",
    "gemma3": "llamaherd.model.gemma3:Transformer",
    "mllama": "llamaherd.model.mllama:Transformer",  # Llama 3.2 Vision
}


def model_class(arch: str) -> type[nn.Module]:
    try:
        target = ARCHITECTURES[arch]
    except KeyError:
        raise ConfigError(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}") from None
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def build(config: ModelConfig, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """Instantiate the model for `config`. device="meta" gives a weightless shell for loading by assignment."""
    cls = model_class(config.arch)
    with torch.device(device or "cpu"):
        model = cls(config)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
