"""Packed (quantized) GGUF weights cut over tensor-parallel ranks, on the boundaries of their ggml blocks.

A packed tensor is (rows, row_bytes) uint8: each row is K/B blocks of B columns (B = 32 for Q4_0/Q5_0/Q8_0,
256 for the K-quants), each block `type_size` bytes that decode on their own (ggml `ggml-common.h`). So

    column-parallel (wq, wk, wv, w1, w3), the vocabulary   whole rows: any cut is legal
    row-parallel (wo, w2: the input width K is split)     each row's blocks [r K/N / B, (r+1) K/N / B): legal
                                                           only when K/N is a multiple of B

and a rank's slice is itself packed rows of the same type, which the native ggml kernels (quant/ggml.py's
modules) take as they are. A cut that would split a block is refused before any process starts. The per-rank
products then match the uncut model's block by block (the int8 activation blocks of the kernels too, since
the cut falls on a block boundary); only the order of the all-reduce's float32 sums differs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from ..config import ModelConfig
from ..quant.ggml import GGMLEmbedding, GGMLWeight, swap_ggml
from .tp import ParallelError, VocabParallelEmbedding, local_slice, vocab_parallel_lookup

CHUNK_BYTES = 16 << 20  # source rows copied (and their pages handed back) at a time


def packed_cut(name: str, w: GGMLWeight, config: ModelConfig, rank: int, world: int
               ) -> tuple[int, int, int] | None:
    """(axis, start, length) in the packed bytes of `w` (the whole tensor `name`) that rank `rank` keeps; None:
    all of it. Raises ParallelError when the cut of the input width would split a block."""
    cut = local_slice(name, (w.shape[0], w.n_cols), config.arch, config.vocab_size, rank, world, config.n_kv_heads)
    if cut is None or cut[0] == 0:
        return cut  # whole rows
    axis, start, length = cut
    q = w.qtype
    if length % q.block_size:
        fits = [n for n in range(1, w.n_cols // q.block_size + 1)
                if w.n_cols % n == 0 and (w.n_cols // n) % q.block_size == 0]
        raise ParallelError(
            f"{name} is {q.name} with K = {w.n_cols} input columns; --tp {world} would give each rank K/N = "
            f"{w.n_cols // world} columns, not a multiple of {q.name}'s {q.block_size}-column blocks, so the packed "
            f"rows cannot be cut on block boundaries. Pick a --tp whose K/N is a multiple of {q.block_size} (for "
            f"this tensor {fits[:8]}), or use a float or Q8_0 file of the model (herd quantize SRC OUT.gguf "
            "--type q8_0, from its float weights)")
    return axis, start // q.block_size * q.type_size, length // q.block_size * q.type_size


def check_packed(weights: dict[str, torch.Tensor], config: ModelConfig, world: int) -> None:
    """Raise ParallelError (naming the tensor, its type, K and N) unless every packed tensor cuts on blocks."""
    for name, t in weights.items():
        if isinstance(t, GGMLWeight):
            packed_cut(name, t, config, 0, world)


def packed_slice(name: str, w: GGMLWeight, config: ModelConfig, rank: int, world: int,
                 drop: Callable[[torch.Tensor], None] | None = None) -> GGMLWeight:
    """This rank's slice of the packed tensor `w`, copied out of the mapped file (only its rows are read).

    Copied in chunks of CHUNK_BYTES of source rows; `drop(rows)` is called with each chunk of whole source rows
    once it is copied (the mapped pages can then be handed back: a 262144-row embedding is not held twice)."""
    cut = packed_cut(name, w, config, rank, world)
    whole = w.plain()
    rows = whole if cut is None or cut[0] == 1 else whole.narrow(*cut)  # the source rows this rank reads
    first = 0 if rows is whole else cut[1]
    mine = rows if cut is None or cut[0] == 0 else rows.narrow(*cut)
    out = torch.empty(mine.shape, dtype=torch.uint8)
    step = max(1, CHUNK_BYTES // max(1, whole.shape[1]))
    for i in range(0, mine.shape[0], step):
        out[i : i + step].copy_(mine[i : i + step])
        if drop is not None:
            drop(whole[first + i : first + i + step])
    return GGMLWeight(out, w.qtype)


class VocabParallelGGMLEmbedding(GGMLEmbedding):
    """A packed embedding holding vocabulary rows [lo, hi) (tp.VocabParallelEmbedding over packed rows)."""

    lo: int
    hi: int
    group: dist.ProcessGroup | None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_lookup(ids, self.lo, self.hi, self.group, super().forward)


def swap_packed(net: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """On the cut, weightless model: packed-weight modules (this rank's widths) for every packed tensor of
    `weights`; the vocabulary-parallel embedding stays vocabulary-parallel."""
    qtypes = {n: t.qtype for n, t in weights.items() if isinstance(t, GGMLWeight)}
    old = net.tok_embeddings
    emb = qtypes.pop("tok_embeddings.weight", None) if isinstance(old, VocabParallelEmbedding) else None
    swap_ggml(net, qtypes)  # the Linears already have this rank's in/out features
    if emb is not None:
        new = VocabParallelGGMLEmbedding(old.num_embeddings, old.embedding_dim, emb, device=old.weight.device)
        new.lo, new.hi, new.group = old.lo, old.hi, old.group
        net.tok_embeddings = new


__all__ = ["VocabParallelGGMLEmbedding", "check_packed", "packed_cut", "packed_slice", "swap_packed"]
