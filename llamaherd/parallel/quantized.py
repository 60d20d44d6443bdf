"""`--quantize int8|int4[-gN]` under tensor parallelism: each rank quantizes its slice after the cut, to exactly
the codes and scales that slice has in the uncut model's quantization (quant/weight_only.py).

    column-parallel (wq, wk, wv, w1, w3) and the vocabulary   whole rows: a row's int8 scale and its int4
                                                              groups are the row's own, so the slice's are
    row-parallel (wo, w2), int4                               each row's groups of G columns: the cut must fall
                                                              on group boundaries (K/N a multiple of G)
    row-parallel (wo, w2), int8                               one scale per row from the whole row's absolute
                                                              maximum: the ranks agree on it (an all-reduce MAX)

so the quantized TP=N model computes what the quantized uncut model computes, up to the float32 sum order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..quant import weight_only
from .tp import ParallelError, VocabParallelProjection, split_dim

INT4_ROWS = 16  # aten `_convert_weight_to_int4pack_for_cpu`: "expect N to be dividable by 16"


class VocabParallelQuantizedProjection(VocabParallelProjection):
    """The vocabulary-parallel projection over this rank's quantized vocabulary rows (float32 logits, gathered)."""

    linear: nn.Module

    def local(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.linear(h.float()).float()


def _int8_whole_rows(weight: torch.Tensor, group) -> nn.Module:
    """An Int8Linear of this rank's columns of a row-parallel weight, scaled by the whole rows' absmax."""
    amax = weight.detach().float().abs().amax(dim=1)
    dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    # quantize_int8 over the slice plus one column holding the whole row's absmax: its scale is the uncut
    # row's, and that column's code is dropped
    module = weight_only.make_module("int8", None, torch.cat([weight.detach().float(), amax[:, None]], dim=1))
    cut = weight_only.Int8Linear(weight.shape[1], weight.shape[0], device="meta")
    cut.qweight = nn.Parameter(module.qweight[:, :-1].contiguous(), requires_grad=False)
    cut.scales = module.scales
    return cut


def quantize_cut(net: nn.Module, spec: str) -> list[str]:
    """`weight_only.quantize` for a model cut by `apply_tensor_parallel` (float weights, before the native
    swaps); every rank calls it. Returns the names quantized."""
    tp = net.tensor_parallel
    scheme, group_size = weight_only.parse_scheme(spec)
    done = []
    for parent_name, parent in list(net.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if not isinstance(child, nn.Linear) or child.bias is not None or name == "output":
                continue
            row_parallel = split_dim(f"{full}.weight", tp.config.arch) == 1
            if not weight_only.quantizable(full, child, scheme, group_size):
                whole_k = child.in_features * tp.world
                if row_parallel and whole_k % (group_size or 2) == 0:  # the uncut model quantizes it: so must the cut
                    raise ParallelError(f"{full} has K = {child.in_features * tp.world} input columns; --tp "
                                        f"{tp.world} leaves {child.in_features} per rank, not a multiple of "
                                        f"{spec}'s groups of {group_size}: pick a smaller group (-g32) or --tp")
                continue
            if scheme == "int4" and child.out_features % INT4_ROWS and not row_parallel:
                raise ParallelError(f"{full} keeps {child.out_features} rows per rank under --tp {tp.world}; torch's "
                                    f"CPU int4 kernel takes multiples of {INT4_ROWS}: use int8, or another --tp")
            new = _int8_whole_rows(child.weight, tp.group) if row_parallel and scheme == "int8" else \
                weight_only.make_module(scheme, group_size, child.weight)
            setattr(parent, name, new)
            done.append(full)
    w = net.output_weight()
    if w.shape[1] % (group_size or 2) == 0 and (scheme == "int8" or w.shape[0] % INT4_ROWS == 0):
        net.project.__class__ = VocabParallelQuantizedProjection
        net.project.linear = weight_only.make_module(scheme, group_size, w)
        done.append("project.linear")
    weight_only.group_siblings(net)
    return done


__all__ = ["VocabParallelQuantizedProjection", "quantize_cut"]
