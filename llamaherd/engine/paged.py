"""Paged KV cache for the serving engine: block allocator with prefix caching, storage, per-step batch views,
and the manager that keeps each sequence's blocks.

Keys and values live in fixed-size blocks (vLLM's PagedAttention, Kwon et al. 2023). A sequence owns a block
table; full blocks are hashed by their token ids and their prefix, so a later request with the same prompt
prefix reuses them instead of recomputing. Freed blocks that hold a cached prefix stay reusable until the
allocator needs their space (least recently freed first).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence

import torch

from ..config import ModelConfig
from ..errors import LlamaherdError


class OutOfBlocks(LlamaherdError):
    """No free KV-cache block is left; the scheduler preempts a sequence and retries."""


def block_hashes(tokens: Sequence[int], block_size: int, salt: int = 0) -> list[int]:
    """Hash of every full block of `tokens`, each chained to its prefix (so equal hashes mean equal prefixes).
    A salt (a request's image digest) starts the chain: equal tokens with other images never match."""
    out, parent = [], salt
    for i in range(len(tokens) // block_size):
        parent = hash((parent, tuple(tokens[i * block_size : (i + 1) * block_size])))
        out.append(parent)
    return out


class BlockAllocator:
    """Hands out block ids with reference counts; remembers which blocks hold which cached prefix."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        self._by_hash: dict[int, int] = {}  # prefix hash -> block holding it
        self._hash_of: dict[int, int] = {}  # block -> its prefix hash
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody uses, oldest first

    @property
    def num_free(self) -> int:
        """Blocks available to new work: never used, or only holding an evictable cached prefix."""
        return len(self._free) + len(self._evictable)

    def allocate(self) -> int:
        if self._free:
            block = self._free.popleft()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._by_hash[self._hash_of.pop(block)]
        else:
            raise OutOfBlocks("the KV cache has no free block")
        self._refs[block] = 1
        return block

    def release(self, block: int) -> None:
        assert self._refs[block] > 0, f"block {block} released more often than taken"
        self._refs[block] -= 1
        if self._refs[block] == 0:
            if block in self._hash_of:
                self._evictable[block] = None
            else:
                self._free.append(block)

    def register(self, block: int, prefix_hash: int) -> None:
        """Mark a full block as holding the prefix with this hash (first writer wins)."""
        if block not in self._hash_of and prefix_hash not in self._by_hash:
            self._by_hash[prefix_hash] = block
            self._hash_of[block] = prefix_hash

    def take_cached(self, prefix_hash: int) -> int | None:
        """The block caching this prefix, with a reference taken, or None."""
        block = self._by_hash.get(prefix_hash)
        if block is None:
            return None
        if self._refs[block] == 0:
            del self._evictable[block]
        self._refs[block] += 1
        return block


class PagedKVCache:
    """Key/value storage (n_layers, n_kv_heads, num_blocks * block_size, head_dim): slots addressed flat."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, *, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        shape = (config.n_layers, config.n_kv_heads, num_blocks * block_size, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.allocator = BlockAllocator(num_blocks, block_size)
        self.block_size = block_size

    def slots(self, table: Sequence[int], start: int, end: int) -> torch.Tensor:
        """Flat slot index of token positions [start, end) of a sequence with this block table."""
        pos = torch.arange(start, end)
        blocks = torch.as_tensor(table, dtype=torch.long)[pos // self.block_size]
        return blocks * self.block_size + pos % self.block_size


class BatchView:
    """One forward step's window on the paged cache, speaking the model's cache protocol (`length`, `update`).

    Row i has `cached[i]` tokens already in the cache and `new` tokens in this step. Histories are laid out
    right-aligned (left-padded) so every row's new tokens sit at slots [length, length + new); `key_mask`
    marks the real ones and `positions` gives each row its own rotary positions.
    """

    def __init__(self, cache: PagedKVCache, tables: Sequence[Sequence[int]], cached: Sequence[int], new: int) -> None:
        self.cache = cache
        B = len(tables)
        self.length = S = max(cached)
        device = cache.k.device
        gather = torch.zeros(B, S, dtype=torch.long)
        valid = torch.zeros(B, S + new, dtype=torch.bool)
        write = torch.empty(B, new, dtype=torch.long)
        for i, (table, n) in enumerate(zip(tables, cached)):
            if n:
                gather[i, S - n :] = cache.slots(table, 0, n)
            valid[i, S - n :] = True
            write[i] = cache.slots(table, n, n + new)
        self.gather = gather.to(device)
        self.write = write.to(device)
        self.key_mask = valid.to(device)
        self.positions = (torch.as_tensor(cached)[:, None] + torch.arange(new)[None]).to(device)

    def slot_table(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The storage's keys and values and each row's slot ids (B, length + new), histories left-padded as
        `key_mask` shows: what a native step reads and writes in place of `update` (native/step.py)."""
        return self.cache.k, self.cache.v, torch.cat([self.gather, self.write], dim=1)

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (B, Hkv, T, D) -> all keys/values of the rows (B, Hkv, length + T, D); new ones stored."""
        K, V = self.cache.k[layer], self.cache.v[layer]  # (Hkv, slots, D)
        K[:, self.write] = k.transpose(0, 1).to(K.dtype)
        V[:, self.write] = v.transpose(0, 1).to(V.dtype)
        if self.length == 0:
            return k, v
        hist_k = K[:, self.gather].transpose(0, 1)  # (B, Hkv, S, D)
        hist_v = V[:, self.gather].transpose(0, 1)
        return torch.cat([hist_k, k], dim=2), torch.cat([hist_v, v], dim=2)


class KVCacheManager:
    """The engine's bookkeeping over the paged cache (vLLM v1's `KVCacheManager`): which blocks each sequence
    holds, prefix lookup, reservation of blocks for a step, registration of full blocks, and release.

    The scheduler decides who runs; this class decides where their keys and values live. Sequences are named
    by the engine's ids; their block tables stay here.
    """

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, *, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        self.storage = PagedKVCache(config, num_blocks, block_size, dtype=dtype, device=device)
        self.allocator = self.storage.allocator
        self.block_size = block_size
        self._tables: dict[int, list[int]] = {}
        self._hashed: dict[int, int] = {}  # leading full blocks of a sequence registered for prefix caching
        self._salts: dict[int, int] = {}  # a sequence's prefix-hash salt (its images' digest), when not 0
        self._held: dict[int, list[int]] = {}  # blocks held for keys/values kept outside the cache (`hold`)

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free(self) -> int:
        return self.allocator.num_free

    def usage(self) -> float:
        """Fraction of blocks in use (cached prefixes nobody uses count as free)."""
        return 1.0 - self.num_free / self.num_blocks

    def take_prefix(self, seq_id: int, tokens: Sequence[int], salt: int = 0) -> int:
        """Give a new sequence the cached blocks of its longest known prefix, leaving at least one token to
        compute (its logits give the next token). Returns how many tokens those blocks hold. `salt` keys the
        sequence's blocks apart from those of equal tokens with other salts (images: their digest)."""
        assert seq_id not in self._tables, f"sequence {seq_id} already holds blocks"
        table = self._tables[seq_id] = []
        if salt:
            self._salts[seq_id] = salt
        usable = (len(tokens) - 1) // self.block_size
        for h in block_hashes(tokens[: usable * self.block_size], self.block_size, salt):
            block = self.allocator.take_cached(h)
            if block is None:
                break
            table.append(block)
        self._hashed[seq_id] = len(table)
        return len(table) * self.block_size

    def reserve(self, seq_id: int, tokens: int) -> None:
        """Make the sequence's table cover `tokens` slots; OutOfBlocks if the cache cannot (blocks taken
        before the failure stay with the sequence until it is released)."""
        table = self._tables[seq_id]
        while len(table) * self.block_size < tokens:
            table.append(self.allocator.allocate())

    def hold(self, key: int, blocks: int) -> bool:
        """Take `blocks` blocks under `key` for keys/values kept outside the cache (a request's images'
        cross-attention keys and values), so that they count against the same budget; False, taking nothing,
        when too few are free. `release_held(key)` gives them back."""
        if blocks > self.allocator.num_free:
            return False
        self._held.setdefault(key, []).extend(self.allocator.allocate() for _ in range(blocks))
        return True

    def release_held(self, key: int) -> None:
        for block in self._held.pop(key, ()):
            self.allocator.release(block)

    def register(self, seq_id: int, tokens: Sequence[int], cached: int) -> None:
        """The first `cached` tokens are in the cache now: offer the newly full blocks for prefix reuse."""
        full, done = cached // self.block_size, self._hashed[seq_id]
        if full > done:
            hashes = block_hashes(tokens[: full * self.block_size], self.block_size, self._salts.get(seq_id, 0))
            table = self._tables[seq_id]
            for i in range(done, full):
                self.allocator.register(table[i], hashes[i])
            self._hashed[seq_id] = full

    def release(self, seq_id: int) -> None:
        """Free a sequence's blocks (cached prefixes among them stay reusable until evicted)."""
        for block in self._tables.pop(seq_id, ()):
            self.allocator.release(block)
        self._hashed.pop(seq_id, None)
        self._salts.pop(seq_id, None)

    def view(self, seq_ids: Sequence[int], cached: Sequence[int], new: int) -> BatchView:
        """The window of one forward step over these sequences (see `BatchView`)."""
        return BatchView(self.storage, [self._tables[i] for i in seq_ids], cached, new)
