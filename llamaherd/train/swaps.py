"""Training-time swaps over the built model: 4-bit base weights for QLoRA, and activation checkpointing per layer."""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from gguf import GGMLQuantizationType as Q
from torch import nn

from ..quant.ggml import GGMLLinear, GGMLWeight
from ..quant.quantize import quantize


def quantize_linears(net: nn.Module) -> int:
    """Replace every float nn.Linear inside the decoder layers by a frozen 4-bit GGMLLinear (Q4_K, or Q4_0 where
    rows are not a multiple of 256 columns). Layers already packed (a GGUF model) are left alone. Returns the count.

    QLoRA (Dettmers et al. 2023) keeps the base in 4 bits; here the 4-bit format is ggml's, so the same kernels and
    the same LoRA wrapper serve a float checkpoint and a GGUF file.
    """
    count = 0
    for name, mod in list(net.named_modules()):
        if not name.startswith("layers.") or type(mod) is not nn.Linear or mod.bias is not None:
            continue
        qtype = Q.Q4_K if mod.in_features % 256 == 0 else Q.Q4_0
        raw, _ = quantize(mod.weight.detach().float().cpu(), qtype)
        packed = GGMLLinear(mod.in_features, mod.out_features, int(qtype))
        packed.weight = GGMLWeight(torch.from_numpy(raw).to(mod.weight.device), int(qtype))
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent), child, packed)
        count += 1
    return count


def checkpoint_activations(net: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them (torch.utils.checkpoint).

    The layer's forward is wrapped on the instance: its parameters and names are unchanged.
    """
    for layer in net.layers:
        inner = layer.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return torch.utils.checkpoint.checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = forward
