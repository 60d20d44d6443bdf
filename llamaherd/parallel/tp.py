"""Tensor parallelism as a swap over the built model: `apply_tensor_parallel(net, group)` keeps this rank's slice.

The cut is Meta's (fairscale's layers in llama-models `llama3/model.py`, `llama4/model.py`, `llama4/moe.py`; the
rule table is `checkpoint/transforms.py`'s `SHARD_RULES`, the one that merges and splits Meta's shards):

    wq, wk, wv, w1, w3 (and the shared expert's)   column-parallel: rank r keeps the r-th block of output rows,
                                                    so each rank holds n_heads / N query and n_kv_heads / N
                                                    key/value heads (grouped-query attention split by KV heads)
                                                    or, with fewer KV heads than ranks (Gemma 3 270M has one),
                                                    the one KV head its query heads read, replicated on the
                                                    N / n_kv_heads ranks that share it (vLLM's
                                                    `QKVParallelLinear`, num_kv_head_replicas)
    wo, w2 (and the shared expert's)               row-parallel: the matching block of input columns
    Llama 4 routed experts (E, D, F) / (E, F, D)   every expert on every rank, its width F cut in N
    tok_embeddings, output                         vocabulary-parallel: a block of vocabulary rows
    norms, Llama 4's router                        replicated

A block's partial outputs are summed by one all-reduce at the end of each attention and each feed-forward
(a forward hook on the module, as gpt-fast's `tp.py` does), so the residual stream is whole on every rank; the
logits of each vocabulary block are all-gathered. The model files are untouched: the swap only narrows
parameters, sets each attention's local head counts and replaces the embedding and the vocabulary projection
by subclasses that add the collective. Inference only (the collectives are not differentiable).

`net.config` becomes this rank's view (n_heads and n_kv_heads divided by N), so every KV cache built from it
(`KVCache.for_model`, the paged engine) holds this rank's heads only; `net.tensor_parallel` keeps the group and
the whole model's config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..checkpoint.transforms import shard_dim
from ..config import ModelConfig
from ..errors import LlamaherdError
from ..model import gemma3, llama, llama4
from ..model.moe import MoE
from ..native.swaps import NativeVocabProjection

ARCHS = ("llama", "llama4", "gemma3")  # the families a model-parallel cut is defined for


class ParallelError(LlamaherdError, ValueError):
    """A model cannot be cut over this many ranks (heads, widths), or holds weights the cut does not know."""


@dataclass(frozen=True)
class TensorParallel:
    """What a cut model knows of its group: this rank, the world, and the whole model's configuration."""

    group: dist.ProcessGroup | None
    rank: int
    world: int
    config: ModelConfig  # the whole model's (net.config is this rank's view)


# -- where a tensor is cut --------------------------------------------------------------------------------------


def split_dim(name: str, arch: str) -> int | None:
    """The axis tensor `name` (a canonical parameter name) is cut on under tensor parallelism; None: replicated.

    Meta's shard rules, plus the vocabulary-parallel embedding for every family (Llama 2's Meta files cut
    tok_embeddings by width instead; such a shard is joined on reading). Gemma 3 has Llama's names; its extra
    norms are replicated.
    """
    if name == "tok_embeddings.weight":
        return 0
    return shard_dim(name, "llama4" if arch == "llama4" else "llama")


def vocab_range(vocab_size: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [lo, hi) of the vocabulary rank `rank` holds: blocks of ceil(V / N), the last one shorter."""
    per = -(-vocab_size // world)
    return min(rank * per, vocab_size), min((rank + 1) * per, vocab_size)


def local_kv_heads(n_kv_heads: int, world: int) -> int:
    """Key/value heads each rank holds: its share, or the one it shares with others when they are fewer."""
    return n_kv_heads // world if n_kv_heads >= world else 1


def local_slice(name: str, shape: tuple[int, ...], arch: str, vocab_size: int, rank: int, world: int,
                n_kv_heads: int | None = None) -> tuple[int, int, int] | None:
    """(axis, start, length) of the whole tensor `name` of `shape` that rank `rank` keeps; None: all of it.

    With `n_kv_heads` below `world`, wk and wv give each rank the rows of the KV head its query heads read.
    """
    axis = split_dim(name, arch)
    if axis is None or world == 1:
        return None
    if name in ("tok_embeddings.weight", "output.weight"):
        lo, hi = vocab_range(vocab_size, rank, world)
        return axis, lo, hi - lo
    if n_kv_heads is not None and n_kv_heads < world and name.endswith(("attention.wk.weight", "attention.wv.weight")):
        # query heads [r H/N, (r+1) H/N) read KV head r H/N / (H/KV) = r // (N/KV) (world % n_kv_heads == 0)
        rows = shape[axis] // n_kv_heads
        return axis, rank // (world // n_kv_heads) * rows, rows
    size = shape[axis]
    if size % world:
        raise ParallelError(f"{name} has {size} along the axis tensor parallelism cuts; {world} ranks do not divide "
                            f"it: pick a --tp that divides it")
    step = size // world
    return axis, rank * step, step


def check_divisible(config: ModelConfig, world: int) -> None:
    """Refuse a rank count that does not divide the heads and widths, with the numbers and what to pick."""
    if config.arch not in ARCHS:
        raise ParallelError(f"tensor parallelism covers the {', '.join(ARCHS)} decoders, not arch {config.arch!r}; "
                            "run this model without --tp")
    if config.vision is not None:
        raise ParallelError("tensor parallelism covers the text decoder; this checkpoint has a vision encoder: "
                            "run it without --tp")
    widths = {"n_heads": config.n_heads, "hidden_dim": config.hidden_dim}
    if config.moe is not None:
        widths["moe.hidden_dim"] = config.moe.hidden_dim

    def misfits(n: int) -> dict[str, int]:
        bad = {k: v for k, v in widths.items() if v % n}
        if config.n_kv_heads % n and n % config.n_kv_heads:  # fewer KV heads than ranks: replicated
            bad = {"n_kv_heads": config.n_kv_heads, **bad}
        return bad

    bad = misfits(world)
    if bad:
        fits = [n for n in range(1, config.n_heads + 1) if not misfits(n)]
        raise ParallelError(f"--tp {world} must divide {', '.join(f'{k} {v}' for k, v in bad.items())} (n_kv_heads "
                            f"may also divide --tp: KV heads are then replicated); for this model pick one of {fits}")


# -- the parallel modules -------------------------------------------------------------------------------------


class VocabParallelEmbedding(nn.Embedding):
    """An embedding holding vocabulary rows [lo, hi): ids outside look up zeros; the ranks' rows are summed.

    fairscale `VocabParallelEmbedding`: mask, look up, zero the masked rows, all-reduce.
    """

    lo: int
    hi: int
    group: dist.ProcessGroup | None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_lookup(ids, self.lo, self.hi, self.group, lambda local: F.embedding(local, self.weight))


def vocab_parallel_lookup(ids: torch.Tensor, lo: int, hi: int, group: dist.ProcessGroup | None, lookup
                          ) -> torch.Tensor:
    """`lookup` of the ids in rows [lo, hi) of this rank (zeros for the others), summed over the ranks."""
    outside = (ids < lo) | (ids >= hi)
    h = lookup((ids - lo).clamp(0, hi - lo - 1)).masked_fill(outside[..., None], 0)
    dist.all_reduce(h, group=group)
    return h


class VocabParallelProjection(NativeVocabProjection):
    """Logits of this rank's vocabulary block, all-gathered into the whole (..., vocab) float32 logits.

    The block's product is the native projection's (float32 at every length: a bf16 or packed matrix is not
    rounded through a bf16 GEMM output), as the uncut model's is.
    """

    vocab_size: int
    block: int  # rows per rank (the last rank may hold fewer: its logits are padded before the gather)
    group: dist.ProcessGroup | None

    def forward(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        local = self.local(h, weight)
        if local.shape[-1] < self.block:
            local = F.pad(local, (0, self.block - local.shape[-1]))
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)[..., : self.vocab_size]

    def local(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """This rank's block of float32 logits."""
        return super().forward(h, weight).float()


def _become(module: nn.Module, cls: type[nn.Module], **attrs) -> nn.Module:
    """`module`, in place, as an instance of its subclass `cls` (same parameters; the state dict is unchanged)."""
    assert issubclass(cls, type(module)), (cls, type(module))
    module.__class__ = cls
    module.__dict__.update(attrs)
    return module


def _all_reduce_output(group: dist.ProcessGroup | None):
    def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(output, group=group)  # the partial sums of the row-parallel products, made whole
        return output

    return hook


# -- the swap -------------------------------------------------------------------------------------------------


def _narrow(net: nn.Module, config: ModelConfig, rank: int, world: int) -> None:
    """Replace every cut parameter by this rank's slice (a copy, so the whole tensor can be freed)."""
    for name, p in list(net.named_parameters()):
        cut = local_slice(name, tuple(p.shape), config.arch, config.vocab_size, rank, world, config.n_kv_heads)
        if cut is None:
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = net.get_submodule(owner_name)
        axis, start, length = cut
        piece = p.detach().narrow(axis, start, length).clone() if p.device.type != "meta" else \
            torch.empty(*(length if i == axis else s for i, s in enumerate(p.shape)), dtype=p.dtype, device="meta")
        setattr(owner, leaf, nn.Parameter(piece, requires_grad=p.requires_grad))
        if isinstance(owner, nn.Linear):
            owner.out_features, owner.in_features = owner.weight.shape
        elif isinstance(owner, nn.Embedding):
            owner.num_embeddings = owner.weight.shape[0]


def _refuse_foreign(net: nn.Module) -> None:
    """Only the reference modules are cut: packed GGUF, int8/int4, LoRA or native-swapped ones are named and
    refused before any tensor is touched."""
    for name, module in net.named_modules():
        if type(module) in (nn.Linear, nn.Embedding, nn.ModuleList) or type(module).__module__.startswith(
                "llamaherd.model."):
            continue
        raise ParallelError(f"{name or 'the model'} is a {type(module).__name__}; tensor parallelism cuts the float "
                            "reference model before any other swap: load it without --quantize, from float "
                            "(not packed GGUF) weights, without an adapter")


def check_cut(net: nn.Module, world: int) -> None:
    """Raise ParallelError unless `net` can be cut over `world` ranks (no process group needed)."""
    check_divisible(net.config, world)
    _refuse_foreign(net)


def apply_tensor_parallel(net: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Cut a built model (float weights, before the native swaps) to this rank's slice, in place; return it.

    Every rank calls it on the same model; afterwards each forward is a collective (every rank runs it with the
    same inputs) and returns the whole logits on every rank. A meta-device model is cut by shape alone, for a
    rank that then loads only its slices. With one rank the model is returned as it is.
    """
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    config: ModelConfig = net.config
    if world == 1:
        return net
    check_cut(net, world)
    _narrow(net, config, rank, world)
    attention_types = (llama.Attention, llama4.Attention, gemma3.Attention)
    kv_heads = local_kv_heads(config.n_kv_heads, world)
    for block in net.layers:
        attn = block.attention
        assert isinstance(attn, attention_types), type(attn)
        attn.n_heads, attn.n_kv_heads = config.n_heads // world, kv_heads
        attn.register_forward_hook(_all_reduce_output(group))
        assert isinstance(block.feed_forward, (llama.FeedForward, gemma3.FeedForward, MoE))
        block.feed_forward.register_forward_hook(_all_reduce_output(group))
    lo, hi = vocab_range(config.vocab_size, rank, world)
    _become(net.tok_embeddings, VocabParallelEmbedding, lo=lo, hi=hi, group=group)
    block_rows = vocab_range(config.vocab_size, 0, world)[1]
    _become(net.project, VocabParallelProjection, vocab_size=config.vocab_size, block=block_rows, group=group)
    net.tensor_parallel = TensorParallel(group=group, rank=rank, world=world, config=config)
    net.config = config.replace(n_heads=config.n_heads // world, n_kv_heads=kv_heads)
    return net


__all__ = ["ParallelError", "TensorParallel", "apply_tensor_parallel", "check_cut", "local_kv_heads", "local_slice",
           "split_dim", "vocab_parallel_lookup", "vocab_range"]
