"""Loading a model cut over tensor-parallel ranks, each rank reading only its slice of the weights.

A Meta folder written as N model-parallel shards, read by N ranks: rank r memory-maps consolidated.r.pth alone,
which already holds its slice (fairscale's cut is this package's, `tp.py`); nothing is merged. Any other
checkpoint (HF safetensors, a Meta folder of another shard count, GGUF) is read memory-mapped as usual and
each rank copies out only its slice of every tensor it cuts; the pages of the other slices are never copied
(a column slice of a row-major tensor still reads every page of it once, through the page cache). Packed GGUF
tensors are cut on their ggml block boundaries and stay packed (`packed.py`); the mapping is dropped once every
slice is copied, so that the file's pages read no longer count in the rank's resident memory.
"""

from __future__ import annotations

import dataclasses
import mmap
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from ..api import Model, resolve
from ..checkpoint import Checkpoint, read
from ..checkpoint.detect import detect_format
from ..checkpoint.meta_pth import read_rank
from ..errors import CheckpointError
from ..model import build
from ..native import swaps as native_swaps
from ..quant.ggml import GGMLWeight
from .packed import check_packed, packed_slice, swap_packed
from .quantized import quantize_cut
from .tp import ParallelError, apply_tensor_parallel, check_divisible, local_slice, vocab_range


def load_parallel(source: str | Path, *, dtype: torch.dtype | None = None,
                  group: dist.ProcessGroup | None = None, quantize: str | None = None) -> Model:
    """`llamaherd.load` for one rank of a tensor-parallel group: the model cut to this rank's slice.

    Every rank of `group` calls it with the same arguments. The returned Model's `config` is the whole model's;
    its `net.config` is this rank's view (see `tp.apply_tensor_parallel`). `quantize` ("int8", "int4[-gN]")
    quantizes each rank's slice as the uncut model's quantization would (`quantized.py`).
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    path = resolve(source)
    piece = read_rank(path, rank, world) if world > 1 and detect_format(path) == "meta" else None
    if piece is not None:
        ckpt, weights = _own_shard(piece, group)
    else:
        ckpt = read(path)
        weights = ckpt.state_dict
        check_readable(ckpt, world)
    net = build(ckpt.config, device="meta")
    apply_tensor_parallel(net, group)
    swap_packed(net, weights)
    drop = _page_dropper(ckpt.metadata.get("_mmap")) if piece is None else None
    net.load_state_dict(_slices(net, ckpt, weights, rank, world, dtype, whole=piece is None, drop=drop),
                        strict=True, assign=True)
    if quantize is not None:
        if swapped := sorted({type(m).__name__ for m in net.modules() if type(m).__module__ == "llamaherd.quant.ggml"}):
            raise ParallelError(f"--quantize {quantize} requantizes float weights; this checkpoint is packed GGUF "
                                f"({', '.join(swapped)}): run it as it is, without --quantize")
        quantize_cut(net, quantize)
    native_swaps.apply(net.eval())
    metadata = {k: v for k, v in ckpt.metadata.items() if k != "_mmap"} if piece is None else ckpt.metadata
    return Model(net, dataclasses.replace(ckpt, state_dict={}, metadata=metadata))  # the weights live in the net


def check_readable(ckpt: Checkpoint, world: int) -> None:
    """Raise ParallelError unless every tensor of the whole checkpoint `ckpt` can be cut over `world` ranks:
    the heads and widths, and packed GGUF tensors on their block boundaries (other quantized formats refused)."""
    check_divisible(ckpt.config, world)
    packed = any(isinstance(t, GGMLWeight) for t in ckpt.state_dict.values())
    if ckpt.prepare is not None and not packed:
        raise ParallelError(f"{ckpt.source}: {ckpt.metadata.get('quantization', 'quantized')} weights are not cut by "
                            "tensor parallelism; run it without --tp, or use the model's unquantized release")
    check_packed(ckpt.state_dict, ckpt.config, world)


def _own_shard(piece: Checkpoint, group) -> tuple[Checkpoint, dict[str, torch.Tensor]]:
    """A rank's Meta shard made into the cut model's weights: the tie agreed by all ranks; Llama 2's embedding,
    cut by width in Meta's files, gathered and cut by vocabulary as the cut model holds it."""
    sd = dict(piece.state_dict)
    config = piece.config
    flag = torch.tensor([int(piece.metadata["output_equals_embedding"])])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    if config.tie_embeddings or bool(flag):
        sd.pop("output.weight", None)
        config = config.replace(tie_embeddings=True)
    if piece.metadata["embedding_dim"] == 1:
        mine = sd["tok_embeddings.weight"].contiguous()
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, mine, group=group)
        lo, hi = vocab_range(config.vocab_size, dist.get_rank(group), dist.get_world_size(group))
        sd["tok_embeddings.weight"] = torch.cat([p[lo:hi] for p in parts], dim=1)
    return dataclasses.replace(piece, config=config), sd


def _page_dropper(mm: mmap.mmap | None) -> Callable[[torch.Tensor], None] | None:
    """For a GGUF file's private, never-written mapping: a function that hands the pages under a tensor of it
    back to the kernel (madvise DONTNEED: a later read faults them in from the file again), so that the file's
    pages read to copy out one slice do not stay in this rank's resident memory until the mapping closes."""
    if mm is None or not hasattr(mm, "madvise"):
        return None
    base, size, page = torch.frombuffer(mm, dtype=torch.uint8, count=1).data_ptr(), len(mm), mmap.PAGESIZE

    def drop(t: torch.Tensor) -> None:
        start = t.data_ptr() - base
        if 0 <= start < size:  # a view of the mapping (a tensor transformed on reading is not)
            lo = start // page * page
            mm.madvise(mmap.MADV_DONTNEED, lo, min(size, start + t.numel() * t.element_size()) - lo)

    return drop


def _slices(net, ckpt: Checkpoint, weights: dict[str, torch.Tensor], rank: int, world: int,
            dtype: torch.dtype | None, whole: bool, drop: Callable[[torch.Tensor], None] | None = None
            ) -> dict[str, torch.Tensor]:
    """The tensors the cut (meta-device) `net` expects, by name: this rank's slices of whole tensors (`whole`),
    or a shard's tensors as they are; each checked against the shape the cut model implies. `drop(source)`
    is called once each source tensor is copied out."""
    expected = net.state_dict()
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(ckpt.source, f"tensor names do not match the {ckpt.config.arch} architecture: "
                              f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    target = dtype or next((t.dtype for t in weights.values() if t.is_floating_point()), torch.float32)
    out = {}
    for name, want in expected.items():
        t = source = weights[name]
        if isinstance(t, GGMLWeight):  # packed rows, cut on block boundaries, copied out of the mapping
            t = packed_slice(name, t, ckpt.config, rank, world, drop) if whole else t
        else:
            c = ckpt.config
            cut = local_slice(name, tuple(t.shape), c.arch, c.vocab_size, rank, world, c.n_kv_heads) if whole else None
            if cut is not None:
                t = t.narrow(*cut)
        if tuple(t.shape) != tuple(want.shape):
            raise CheckpointError(ckpt.source, f"tensor {name} gives this rank {tuple(t.shape)}, the cut model "
                                  f"implies {tuple(want.shape)}; the files do not belong to the configuration")
        # Cut from a whole checkpoint, every tensor is copied out (own memory): a view kept of any of them (a
        # norm) would keep the whole file's mapping, and every page read through it, alive. A rank's own shard
        # stays mapped, as `llamaherd.load` keeps a whole checkpoint.
        if not isinstance(t, GGMLWeight):
            t = t.to(dtype=target) if t.is_floating_point() else t
            t = t.clone(memory_format=torch.contiguous_format) if whole else t.contiguous()
        out[name] = t
        if drop is not None:
            drop(source)
    return out


__all__ = ["check_readable", "load_parallel"]
