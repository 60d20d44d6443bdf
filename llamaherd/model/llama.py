"""The Llama 1 to 3.3 decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU, optional tied output.

Parameter names follow Meta's llama-models `llama3/model.py`, the canonical names of this package.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .cache import KVCache
from .rope import Frequencies, Rotary, default_positions, rope_angles


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in float32 and cast back before the scale (as Meta's reference)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def attention_mask(
    start: int, q_len: int, key_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """Boolean mask (B or 1, 1, T, S) for T queries at slots [start, start+T) over S = start+T keys.

    `key_mask` is (B, S), the real slots of a left-padded batch, or (B, T, S), which keys each query may see
    (block-diagonal for packed training rows); causality is applied on top of either.

    None means plain causal attention handled by the caller's fast path. Each query may always see its own
    slot, so padded rows never softmax over nothing (and never turn into NaN that would leak through values).
    """
    if key_mask is None and (q_len == 1 or start == 0):
        return None
    q_slots = torch.arange(start, start + q_len, device=device)[:, None]
    k_slots = torch.arange(start + q_len, device=device)[None, :]
    allowed = k_slots <= q_slots  # (T, S)
    if key_mask is not None:
        # (B, S): real slots of a padded batch; (B, T, S): per-query visibility (packed training examples)
        seen = key_mask[:, None, :] if key_mask.dim() == 2 else key_mask
        allowed = (allowed & seen.to(torch.bool)) | (k_slots == q_slots)
        return allowed[:, None]  # (B, 1, T, S)
    return allowed[None, None]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None = None):
    """Scaled dot-product attention over (B, H, T, D) queries and (B, Hkv, S, D) keys/values (GQA aware)."""
    causal = mask is None and q.shape[2] > 1
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.rope = Rotary()

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int, start: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(layer, start, k, v)  # (B, Hkv, start+T, D)
        out = sdpa(q, k, v, mask)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class VocabProjection(nn.Module):
    """The output layer: final hidden states (..., dim) times the vocabulary matrix (vocab, dim) -> float32 logits.

    A module of its own (no parameters: the matrix is `output.weight` or, tied, `tok_embeddings.weight`) so
    that every family projects through one place, and a post-load swap can replace it.
    """

    def forward(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(h, weight).float()


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config.dim, config.hidden_dim)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, cos, sin, mask, cache, layer, start):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, layer, start)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Token ids (B, T) -> float32 logits (B, T, vocab).

    `positions` (B, T) are rotary positions (default: the cache's next slots). `key_mask` (B, start+T) marks
    real tokens among cached slots, for left-padded batches. With a cache, T new tokens are appended to it.
    `last_only` computes logits for the last position only, (B, 1, vocab): what prefill needs.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        if not config.tie_embeddings:
            self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.project = VocabProjection()
        self.freqs = Frequencies(config.head_dim, config.rope_theta, config.rope_scaling)


    def output_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.config.tie_embeddings else self.output.weight

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        key_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        B, T = tokens.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = default_positions(tokens, start)
        cos, sin = rope_angles(positions, self.freqs.on(tokens.device))
        mask = attention_mask(start, T, key_mask, tokens.device)
        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, cache, i, start)
        if cache is not None:
            cache.length = start + T
        if last_only:  # prefill needs only the next token's logits: skip T-1 vocab projections
            h = h[:, -1:]  # (B, 1, dim)
        h = self.norm(h)
        return self.project(h, self.output_weight())
