"""Training-time swaps over the built model: 4-bit base weights for QLoRA, gradients through weight-only int8/int4
projections, and activation checkpointing per layer."""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from gguf import GGMLQuantizationType as Q
from torch import nn

from ..quant.ggml import GGMLEmbedding, GGMLLinear, GGMLWeight
from ..quant.quantize import quantize
from ..quant.weight_only import Int4Linear, Int8Linear


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


def dequantize_packed(net: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace every packed GGUF Linear/Embedding by a frozen float one holding the decoded weights (LoRA over a
    float base, as opposed to QLoRA over the packed one). Returns the count."""
    count = 0
    for name, mod in list(net.named_modules()):
        if isinstance(mod, GGMLLinear):
            new: nn.Module = nn.Linear(mod.in_features, mod.out_features, bias=False, device=mod.weight.device)
        elif isinstance(mod, GGMLEmbedding):
            new = nn.Embedding(mod.num_embeddings, mod.embedding_dim, device=mod.weight.device)
        else:
            continue
        new.weight = nn.Parameter(_decoded(mod.weight, dtype), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, child, new)
        count += 1
    return count


def _decoded(w: GGMLWeight, dtype: torch.dtype) -> torch.Tensor:
    """The whole float matrix, decoded chunk by chunk into its final tensor: no float32 temporary of the whole
    (a 262K-row Gemma 3 vocabulary is 671 MB in float32; decoding it at once took the bf16 LoRA setup to 2.5 GB)."""
    from ..lora.layer import decoded_chunks

    out = torch.empty(w.shape[0], w.n_cols, dtype=dtype, device=w.device)
    for i, chunk in decoded_chunks(w, dtype):
        out[i : i + chunk.shape[0]] = chunk
    return out


def differentiable_weight_only(net: nn.Module) -> int:
    """Let gradients pass through every frozen weight-only int8/int4 projection (torch's int8/int4 kernels have no
    derivative): with a gradient wanted, the product goes through `lora.layer._WeightOnlyMatmul`, which multiplies
    by the dequantised matrix in backward. Patched on the instance, so names and types stay. Returns the count."""
    from ..lora.layer import _WeightOnlyMatmul

    count = 0
    for mod in net.modules():
        if not isinstance(mod, (Int8Linear, Int4Linear)):
            continue

        def forward(x: torch.Tensor, _mod=mod) -> torch.Tensor:
            if torch.is_grad_enabled() and x.requires_grad:
                return _WeightOnlyMatmul.apply(x, _mod)
            return type(_mod).forward(_mod, x)

        mod.forward = forward
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


class TrainedRows(nn.Module):
    """The vocabulary projection of the trained positions only: (B, T, D) hidden states -> (N, V) float32 logits.

    Training needs logits where a label is; with a 262K vocabulary (Gemma 3) projecting every position is most of
    the step. `rows` (B, T) bool is set before each forward (`selecting`); None projects every position as the
    wrapped module does. A packed GGUF vocabulary matrix is multiplied through `lora.layer._PackedMatmul`, decoded in
    chunks in forward and backward, so no float copy of it is kept for backward.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.rows: torch.Tensor | None = None

    def forward(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        from ..lora.layer import _PackedMatmul

        if self.rows is not None and h.shape[:2] == self.rows.shape:
            h = h[self.rows]  # (N, D)
        if isinstance(weight, GGMLWeight) and torch.is_grad_enabled() and h.requires_grad:
            return _PackedMatmul.apply(h, weight).float()
        return self.inner(h, weight)


def project_trained_rows(net: nn.Module) -> TrainedRows:
    """Wrap the model's vocabulary projection (`net.project`) in a TrainedRows, once."""
    if not isinstance(net.project, TrainedRows):
        net.project = TrainedRows(net.project)
    return net.project


class selecting:
    """Context manager: during the forward, project only the positions where `rows` is True."""

    def __init__(self, net: nn.Module, rows: torch.Tensor | None) -> None:
        self.proj = net.project if isinstance(getattr(net, "project", None), TrainedRows) else None
        self.rows = rows

    def __enter__(self):
        if self.proj is not None:
            self.proj.rows = self.rows

    def __exit__(self, *exc):
        if self.proj is not None:
            self.proj.rows = None
