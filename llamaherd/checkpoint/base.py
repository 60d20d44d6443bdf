"""What every checkpoint reader returns, and how it becomes a model: build on meta, assign, strictly."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import GenerationDefaults, ModelConfig
from ..errors import CheckpointError
from ..model import build
from ..quant.ggml import GGMLWeight
from ..tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class Checkpoint:
    """A checkpoint read from disk: configuration plus a state dict in canonical (Meta) names.

    Tensors may be memory-mapped; nothing is copied until `materialize`. `prepare` lets a format swap
    modules on the weightless model before the weights are assigned (quantized GGUF linears, say).
    """

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    source: Path
    tokenizer: Any = None  # a llamaherd Tokenizer, or None when the checkpoint carries none
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    chat_template: str | None = None
    prepare: Callable[[nn.Module], None] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def stored_dtype(state_dict: dict[str, torch.Tensor]) -> torch.dtype:
    for t in state_dict.values():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def materialize(ckpt: Checkpoint, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> nn.Module:
    """Build the model on the meta device and assign the checkpoint's tensors, converting each at most once."""
    net = build(ckpt.config, device="meta")
    if ckpt.prepare is not None:
        ckpt.prepare(net)
    expected = net.state_dict()
    missing = sorted(set(expected) - set(ckpt.state_dict))
    unexpected = sorted(set(ckpt.state_dict) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            ckpt.source,
            f"tensor names do not match the {ckpt.config.arch} architecture: "
            f"missing {_abbrev(missing)}, unexpected {_abbrev(unexpected)}",
        )
    target = dtype or stored_dtype(ckpt.state_dict)
    converted = {}
    for name, want in expected.items():
        t = ckpt.state_dict[name]
        if tuple(t.shape) != tuple(want.shape):
            raise CheckpointError(
                ckpt.source, f"tensor {name} has shape {tuple(t.shape)}, the configuration implies {tuple(want.shape)}"
            )
        if t.is_floating_point() and want.is_floating_point():
            t = t.to(device=device, dtype=target)
        elif device is not None:
            t = t.to(device=device)
        converted[name] = t
    net.load_state_dict(converted, strict=True, assign=True)
    return net.eval()


def as_float(t: torch.Tensor) -> torch.Tensor:
    """A checkpoint tensor as float32: packed ggml rows are decoded, float tensors converted."""
    return t.dequantize() if isinstance(t, GGMLWeight) else t.to(torch.float32)


def warn_requantize(ckpt: Checkpoint, purpose: str) -> None:
    """One line, as `llama-quantize --allow-requantize` accepts it: the output keeps the source's rounding error."""
    types = sorted({t.qtype.name for t in ckpt.state_dict.values() if isinstance(t, GGMLWeight)})
    if types:
        log.warning("%s holds %s tensors: dequantizing them for %s; the result keeps their rounding error "
                    "(start from an F32/F16/BF16 checkpoint for full quality)", Path(ckpt.source).name,
                    "/".join(types), purpose)


def dequantized(ckpt: Checkpoint, purpose: str) -> Checkpoint:
    """A copy of a quantized (GGUF) checkpoint with every packed weight decoded to float32, warning once."""
    if not any(isinstance(t, GGMLWeight) for t in ckpt.state_dict.values()):
        return ckpt
    warn_requantize(ckpt, purpose)
    sd = {k: as_float(t) if isinstance(t, GGMLWeight) else t for k, t in ckpt.state_dict.items()}
    return dataclasses.replace(ckpt, state_dict=sd, prepare=None, metadata={**ckpt.metadata, "quantized": {}})


def _abbrev(names: list[str], n: int = 6) -> str:
    if not names:
        return "none"
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def attach_tokenizer(path: Path, names: tuple[str, ...]):
    """The tokenizer in a checkpoint folder (the first of `names` present), or None when it carries none."""
    for name in names:
        if (path / name).exists():
            return Tokenizer.from_file(path / name)
    return None
