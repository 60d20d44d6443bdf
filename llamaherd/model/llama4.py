"""The Llama 4 text decoder: interleaved MoE/dense layers, chunked-local RoPE layers and global NoPE layers.

Follows llama-models `llama4/model.py` (Meta names are canonical). Per layer i:
  * NoPE layer when nope_layer_interval divides i + 1: no rotary embedding, global causal attention, and
    (attn_temperature_tuning) queries scaled by log(floor((pos + 1) / floor_scale) + 1) * attn_scale + 1;
  * otherwise RoPE layer: rotary embedding, then (use_qk_norm) parameter-free RMS norm of q and k, and
    attention restricted to the query's own chunk of attention_chunk_size positions;
  * MoE feed-forward when moe.interleave_step divides i + 1, dense SwiGLU otherwise.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import Llama4VisionConfig, ModelConfig
from .cache import KVCache
from . import llama
from .llama import FeedForward, RMSNorm, VocabProjection, attention_mask, sdpa
from .moe import MoE
from .rope import Frequencies, default_positions, rope_angles
from .vision_llama4 import ImageFeatures, VisionEmbeddings


def is_nope_layer(config: ModelConfig, layer: int) -> bool:
    # llama-models llama4/model.py::TransformerBlock: (layer_id + 1) % nope_layer_interval == 0
    n = config.nope_layer_interval
    return n is not None and (layer + 1) % n == 0


class L2Norm(nn.Module):
    """Parameter-free RMS norm over the last axis in float32: Llama 4's QK-norm (llama-models `llama4/model.py`)."""

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


def temperature_scales(positions: torch.Tensor, floor_scale: float, attn_scale: float) -> torch.Tensor:
    """Per-query temperature (B, T) for NoPE layers (llama-models llama4/model.py, after arXiv 2501.19399).

    Equal to 1 until position floor_scale - 1, then grows logarithmically: short contexts are unaffected.
    """
    pos = positions.to(torch.float32)
    return torch.log(torch.floor((pos + 1.0) / floor_scale) + 1.0) * attn_scale + 1.0


def key_positions(positions: torch.Tensor, start: int, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Positions (B, S) of the S = start + T key slots, given the queries' positions (B, T) at slots [start, S).

    The cache stores no positions, so those of earlier slots are recovered from the contract of the generation
    path: positions advance by one per real (unmasked) slot, and padding is on the left, so the last slot is
    real. The new slots take the given positions; padded slots get values that their mask makes irrelevant.
    """
    B, T = positions.shape
    S = start + T
    if key_mask is None:
        real = torch.ones(B, S, dtype=torch.long, device=positions.device)
    else:
        real = key_mask[:, :S].to(torch.long)
    seen = torch.cumsum(real, dim=1)  # real slots up to and including each slot
    base = positions[:, -1:] - (seen[:, -1:] - 1)  # position of the row's first real slot
    kpos = base + seen - real
    kpos[:, start:] = positions
    return kpos


def chunked_mask(
    positions: torch.Tensor, start: int, key_mask: torch.Tensor | None, chunk: int
) -> torch.Tensor:
    """Boolean mask (B, 1, T, S): causal, real keys only, and key and query in the same chunk (pos // chunk).

    As in `llama.attention_mask`, each query always sees its own slot so padded rows never softmax over nothing.
    """
    B, T = positions.shape
    S = start + T
    device = positions.device
    q_slots = torch.arange(start, S, device=device)[:, None]
    k_slots = torch.arange(S, device=device)[None, :]
    allowed = (k_slots <= q_slots)[None]  # (1, T, S)
    kpos = key_positions(positions, start, key_mask)
    allowed = allowed & ((kpos[:, None, :] // chunk) == (positions[:, :, None] // chunk))  # (B, T, S)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, :S].to(torch.bool)
    allowed = allowed | (k_slots == q_slots)[None]
    return allowed[:, None]  # (B, 1, T, S)


class Attention(llama.Attention):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__(config)  # the wq, wk, wv, wo projections
        self.use_rope = not is_nope_layer(config, layer)
        self.qk_norm = L2Norm(config.norm_eps) if config.use_qk_norm and self.use_rope else None
        self.temperature_tuning = config.attn_temperature_tuning and not self.use_rope
        self.chunk = config.attention_chunk_size if self.use_rope else None
        self.floor_scale = config.floor_scale
        self.attn_scale = config.attn_scale

    def forward(self, x, cos, sin, positions, masks, cache: KVCache | None, layer: int, start: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.use_rope:
            q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        if self.qk_norm is not None:  # after the rotation, as Meta's reference does
            q, k = self.qk_norm(q), self.qk_norm(k)
        if self.temperature_tuning:
            scales = temperature_scales(positions, self.floor_scale, self.attn_scale)  # (B, T)
            q = (q * scales[:, :, None, None]).to(q.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(layer, start, k, v)  # (B, Hkv, start+T, D)
        if self.chunk:
            mask = masks.get("chunked")
            if mask is None:
                # One query per row, same position in every row, no padding: its chunk is the latest slots.
                first = max(0, start - int(positions[0, 0]) % self.chunk)
                k, v = k[:, :, first:], v[:, :, first:]
        else:
            mask = masks["global"]
        out = sdpa(q, k, v, mask)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attention = Attention(config, layer)
        if config.moe is not None and config.moe.is_moe_layer(layer):
            self.feed_forward: nn.Module = MoE(config)
        else:
            self.feed_forward = FeedForward(config.dim, config.hidden_dim)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, cos, sin, positions, masks, cache, layer, start):
        h = x + self.attention(self.attention_norm(x), cos, sin, positions, masks, cache, layer, start)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Token ids (B, T) -> float32 logits (B, T, vocab); same forward contract as `llama.Transformer`.

    `positions` (B, T) drive the rotary angles, the chunk of each query and the NoPE temperature; `key_mask`
    (B, start+T) marks real slots of a left-padded batch. With a cache, T new tokens are appended to it.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        if not config.tie_embeddings:
            self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.project = VocabProjection()
        self.freqs = Frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        if isinstance(config.vision, Llama4VisionConfig):  # early fusion: image features become patch tokens
            self.vision_embeddings = VisionEmbeddings(config.vision)
            self.vision_projection = nn.Linear(config.vision.output_dim, config.dim, bias=False)


    def output_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.config.tie_embeddings else self.output.weight

    def masks(self, positions: torch.Tensor, start: int, key_mask: torch.Tensor | None) -> dict:
        """"global" for NoPE layers (None: plain causal) and "chunked" for RoPE layers (None: see Attention)."""
        B, T = positions.shape
        masks = {"global": attention_mask(start, T, key_mask, positions.device)}
        chunk = self.config.attention_chunk_size
        same_pos = T == 1 and key_mask is None and bool((positions == positions[0, 0]).all())
        if chunk and not same_pos:
            if start == 0 and key_mask is None and T <= chunk - int(positions[:, 0].remainder(chunk).max()):
                masks["chunked"] = masks["global"]  # every query's chunk holds all its causal keys
            else:
                masks["chunked"] = chunked_mask(positions, start, key_mask, chunk)
        else:
            masks["chunked"] = None
        return masks

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        key_mask: torch.Tensor | None = None,
        last_only: bool = False,
        images: ImageFeatures | None = None,
    ) -> torch.Tensor:
        B, T = tokens.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = default_positions(tokens, start)
        cos, sin = rope_angles(positions, self.freqs.on(tokens.device))
        masks = self.masks(positions, start, key_mask)
        h = self.tok_embeddings(tokens)
        if images is not None:  # the projected image features replace the <|patch|> tokens' embeddings
            h = images.merge(tokens, h)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, positions, masks, cache, i, start)
        if cache is not None:
            cache.length = start + T
        if last_only:  # prefill needs only the next token's logits: skip T-1 vocab projections
            h = h[:, -1:]  # (B, 1, dim)
        h = self.norm(h)
        return self.project(h, self.output_weight())


__all__ = ["Transformer", "is_nope_layer", "temperature_scales", "chunked_mask", "key_positions"]
