"""The Gemma 3 text decoder: offset RMSNorm, QK-norm, sandwich norms, GeGLU, interleaved local/global attention.

Written from the descriptions in HF transformers `models/gemma3/modeling_gemma3.py` and llama.cpp's gemma3
graph (`src/models/gemma3.cpp`). Parameter names follow Meta's where the concept is the same
(`tok_embeddings`, `attention.wq/wk/wv/wo`, `feed_forward.w1/w2/w3`, `attention_norm`, `ffn_norm`, `norm`);
Gemma's additional norms are named here:

    attention.q_norm, attention.k_norm   per-head RMSNorm on queries and keys (HF self_attn.q_norm / k_norm)
    post_attention_norm                  RMSNorm on the attention output before the residual add
    post_ffn_norm                        RMSNorm on the feed-forward output before the residual add

Every Gemma norm scales by (1 + weight): its stored weight is an offset from one, as in HF and Google's
checkpoints (llama.cpp's GGUF files store 1 + weight; checkpoint/gemma3.py converts).

Rotary embeddings here rotate halves (HF/Google layout, llama.cpp's NEOX mode), not Meta's adjacent pairs:
Gemma weights are never permuted by any converter, so no permutation appears anywhere for this family.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .cache import KVCache
from . import llama
from .llama import VocabProjection, attention_mask, sdpa
from .rope import Frequencies, default_positions, rope_angles

def is_global_layer(config: ModelConfig, layer: int) -> bool:
    """Global (full) attention layers: every `sliding_window_pattern`-th one; all of them without a window.

    transformers `Gemma3TextConfig`: layer i slides unless (i + 1) % sliding_window_pattern == 0.
    """
    if config.sliding_window is None or not config.sliding_window_pattern:
        return True
    return (layer + 1) % config.sliding_window_pattern == 0


# ---- building blocks -----------------------------------------------------------------------------


class GemmaRMSNorm(nn.Module):
    """x / rms(x) * (1 + weight), all in float32, cast back after the scale (HF Gemma3RMSNorm's order)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).type_as(x)


def apply_rope_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + D/2]) of x: (B, T, H, D) by angles cos/sin: (B or 1, T, D/2), in float32.

    The "rotate half" layout of HF's `apply_rotary_pos_emb` and llama.cpp's GGML_ROPE_TYPE_NEOX.
    """
    xf = x.float()
    x0, x1 = xf.chunk(2, dim=-1)  # each (B, T, H, D/2)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).type_as(x)


class RotaryHalves(nn.Module):
    """`apply_rope_halves` as a module (no parameters), so that a post-load swap can replace it."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rope_halves(x, cos, sin)


def window_mask(
    start: int, q_len: int, key_mask: torch.Tensor | None, window: int, device: torch.device
) -> torch.Tensor | None:
    """The causal mask of `llama.attention_mask`, further limited to the last `window` slots of each query.

    Key slot k is visible from query slot q when q - window < k <= q (HF `sliding_window_overlay`; llama.cpp
    LLAMA_SWA_TYPE_STANDARD masks q - k >= n_swa). Slots differ from positions by a per-row constant under
    left padding, so the distance is the same in either.
    """
    if start + q_len <= window:
        return attention_mask(start, q_len, key_mask, device)  # no query reaches past its window
    base = attention_mask(start, q_len, key_mask, device)
    q_slots = torch.arange(start, start + q_len, device=device)[:, None]
    k_slots = torch.arange(start + q_len, device=device)[None, :]
    near = (q_slots - k_slots < window)[None, None]  # (1, 1, T, S)
    if base is None:  # plain causal (fast path) or a single query that sees every slot
        return near & (k_slots <= q_slots)[None, None]
    return base & near


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap): Gemma's soft bound on logits."""
    return torch.tanh(x / cap) * cap


class FeedForward(nn.Module):
    """GeGLU: w2(gelu_tanh(w1 x) * w3 x) (HF hidden_activation "gelu_pytorch_tanh")."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x), approximate="tanh") * self.w3(x))


class Attention(llama.Attention):
    """Grouped-query attention with per-head RMSNorm on q and k, scaled by query_pre_attn_scalar ** -0.5."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)  # the wq, wk, wv, wo projections
        self.rope = RotaryHalves()
        self.q_norm = GemmaRMSNorm(config.head_dim, config.norm_eps)
        self.k_norm = GemmaRMSNorm(config.head_dim, config.norm_eps)
        scalar = config.query_pre_attn_scalar or config.head_dim
        self.scale = scalar**-0.5
        # config.attn_logit_softcap is Gemma 2's; Gemma 3 dropped it (transformers' Gemma3Attention never passes
        # it to the attention kernel and llama.cpp's gemma3 graph has no cap), so it is ignored here too.

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int, start: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = self.rope(self.q_norm(q), cos, sin), self.rope(self.k_norm(k), cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(layer, start, k, v)  # (B, Hkv, start+T, D)
        out = sdpa(q, k, v, mask, scale=self.scale)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class TransformerBlock(nn.Module):
    """Sandwich norms: x + post_norm(sublayer(pre_norm(x))) for attention and for the feed-forward."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config.dim, config.hidden_dim)
        self.attention_norm = GemmaRMSNorm(config.dim, config.norm_eps)
        self.post_attention_norm = GemmaRMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = GemmaRMSNorm(config.dim, config.norm_eps)
        self.post_ffn_norm = GemmaRMSNorm(config.dim, config.norm_eps)

    def forward(self, x, cos, sin, mask, cache, layer, start):
        h = x + self.post_attention_norm(self.attention(self.attention_norm(x), cos, sin, mask, cache, layer, start))
        return h + self.post_ffn_norm(self.feed_forward(self.ffn_norm(h)))


# ---- the model -----------------------------------------------------------------------------------


class Transformer(nn.Module):
    """Token ids (B, T) -> float32 logits (B, T, vocab); the forward contract of `model/llama.py`.

    Local (sliding-window) layers use `rope_local_theta` and see the last `sliding_window` slots; global
    layers use `rope_theta` with the optional `rope_scaling` and see every slot. The KV cache keeps all
    slots for every layer; the window is applied by the mask.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = GemmaRMSNorm(config.dim, config.norm_eps)
        if not config.tie_embeddings:
            self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.project = VocabProjection()
        # Scaling applies to the global layers only (HF rope_parameters).
        self.freqs = Frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        self.local_freqs = Frequencies(config.head_dim, config.rope_local_theta or config.rope_theta)


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
        c = self.config
        B, T = tokens.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = default_positions(tokens, start)
        rope = {True: rope_angles(positions, self.freqs.on(tokens.device)),
                False: rope_angles(positions, self.local_freqs.on(tokens.device))}
        masks = {True: attention_mask(start, T, key_mask, tokens.device)}
        if c.sliding_window is not None:
            masks[False] = window_mask(start, T, key_mask, c.sliding_window, tokens.device)
        h = self.tok_embeddings(tokens)
        # sqrt(dim) rounded to the model dtype first, as the reference does (HF Gemma3TextScaledWordEmbedding).
        h = h * torch.tensor(c.dim**0.5, dtype=h.dtype, device=h.device)
        for i, layer in enumerate(self.layers):
            is_global = is_global_layer(c, i)
            cos, sin = rope[is_global]
            h = layer(h, cos, sin, masks[is_global], cache, i, start)
        if cache is not None:
            cache.length = start + T
        if last_only:  # prefill needs only the next token's logits: skip T-1 vocab projections
            h = h[:, -1:]  # (B, 1, dim)
        h = self.norm(h)
        logits = self.project(h, self.output_weight())
        if c.final_logit_softcap is not None:
            logits = softcap(logits, c.final_logit_softcap)
        return logits
