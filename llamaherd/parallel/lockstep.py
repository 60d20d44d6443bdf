"""Rank 0 leads, the other ranks follow: every forward of the cut model on rank 0 is broadcast first, so that
each rank runs the same forward on its own slice and its own mirror of the cache.

Rank 0 runs everything else (the CLI, HTTP, the scheduler, sampling): `lead(net)` makes each forward of its model
send the call's inputs first; `follow(net)` is the other ranks' whole life, a loop of received calls until
`release()` or a failed collective. Caches are mirrored, not sent: a `KVCache` by its shape and length, a paged
step (`engine/paged.BatchView`) by its slot indices, over a pool of the same size kept per rank (this rank's
heads only: `net.config` is the rank's view).
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..engine.paged import BatchView, PagedKVCache
from ..model.cache import KVCache
from .tp import ParallelError, VocabParallelProjection

_STOP = "stop"


def _send(message: Any, group) -> Any:
    box = [message]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _describe_cache(cache: Any) -> tuple | None:
    """What a follower needs to mirror `cache` for one forward (None: no cache)."""
    if cache is None:
        return None
    if isinstance(cache, KVCache):
        return ("kv", id(cache), cache.batch, cache.max_len, cache.k.dtype, cache.length)
    if isinstance(cache, BatchView):
        pool = cache.cache
        return ("paged", id(pool), pool.k.shape[2], pool.block_size, pool.k.dtype, cache.length, cache.gather,
                cache.write, cache.key_mask, cache.positions)
    raise TypeError(f"tensor parallelism cannot mirror a {type(cache).__name__} cache on the other ranks")


class _Led:
    """The forward of rank 0's led model: send the call, then run it; one call at a time (the collectives of two
    threads' forwards must not interleave)."""

    def forward(self, tokens, positions=None, cache=None, key_mask=None, last_only=False, **extra):
        if extra and any(v is not None for v in extra.values()):
            raise ParallelError(f"tensor parallelism forwards tokens, positions, cache, key_mask and last_only, "
                                f"not {sorted(k for k, v in extra.items() if v is not None)}")
        if not isinstance(self.project, VocabParallelProjection):  # a view of the model (embeddings' hidden states)
            raise ParallelError("this model is split over tensor-parallel ranks: only its logits are served "
                                "(embeddings need a server without --tp)")
        with self._lockstep:
            _send(("forward", tokens, positions, _describe_cache(cache), key_mask, bool(last_only)), self._group)
            return super().forward(tokens, positions, cache, key_mask, last_only)


def lead(net: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Make every forward of rank 0's cut `net` send its inputs to the followers first (the class of `net` is
    changed in place to a subclass; modules, parameters and state dict stay as they are)."""
    cls = type(net)
    net.__class__ = type(f"Led{cls.__name__}", (_Led, cls), {})
    net._lockstep, net._group = threading.Lock(), group


def release(group: dist.ProcessGroup | None = None) -> None:
    """Tell the followers that rank 0 is done (they return from `follow`)."""
    _send((_STOP,), group)


class _Mirrors:
    """A follower's caches, one per rank-0 cache it has seen (by that object's id), this rank's heads."""

    def __init__(self, net: nn.Module) -> None:
        self.config = net.config
        self.kv: dict[int, KVCache] = {}
        self.pools: dict[int, PagedKVCache] = {}

    def of(self, spec: tuple | None):
        if spec is None:
            return None
        if spec[0] == "kv":
            _, key, batch, max_len, dtype, length = spec
            cache = self.kv.pop(key, None)
            if cache is None or cache.batch != batch or cache.k.dtype != dtype:
                # a new cache on rank 0 (the id of a dead one may come back: then its slots are rewritten
                # from its length 0 before they are read, as on rank 0)
                cache = KVCache.for_model(self.config, batch, max_len, dtype=dtype)
            self.kv[key] = cache  # most recent last; the few latest are kept
            while len(self.kv) > 4:
                self.kv.pop(next(iter(self.kv)))
            cache.grow(max_len)
            cache.length = length
            return cache
        _, key, slots, block_size, dtype, length, gather, write, key_mask, positions = spec
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = PagedKVCache(self.config, slots // block_size, block_size, dtype=dtype)
        view = BatchView.__new__(BatchView)
        view.cache, view.length, view.gather, view.write = pool, length, gather, write
        view.key_mask, view.positions = key_mask, positions
        return view


@torch.inference_mode()
def follow(net: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Run the forwards rank 0 sends, on this rank's slice, until rank 0 releases the group."""
    mirrors = _Mirrors(net)
    while True:
        message = _send(None, group)
        if message[0] == _STOP:
            return
        _, tokens, positions, cache, key_mask, last_only = message
        net(tokens, positions=positions, cache=mirrors.of(cache), key_mask=key_mask, last_only=last_only)


__all__ = ["follow", "lead", "release"]
