"""Llama 4's vision encoder: tiles -> ViT with 2-D rotary attention -> pixel shuffle -> MLP -> the text width.

The math and parameter names of llama-models `llama4/vision/encoder.py` (`VisionEncoder`), `vision/embedding.py`
(`PixelShuffleMLP`, `VisionEmbeddings`) and the `vision_projection` of `llama4/model.py`. Each tile is encoded on
its own; its features replace the embeddings of the prompt's <|patch|> tokens, in order (`merge_image_features`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Llama4VisionConfig
from .rope import apply_rope


def rope_2d(c: Llama4VisionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (1, patches + 1, head_dim / 2) of the encoder's 2-D rotary embedding.

    Pair j of a head turns by (x + 1) * f_j for the first quarter-head pairs and (y + 1) * f_j for the rest, with
    f_j = theta^(-4j / head_dim) and (x, y) the patch's column and row; the class token, last, does not turn
    (llama-models `VisionEncoder.__init__`: x and y frequencies interleaved, then every second one kept).
    """
    grid = c.image_size // c.patch_size
    quarter = c.width // c.n_heads // 4
    f = 1.0 / (c.rope_theta ** (torch.arange(0, 2 * quarter, 2)[:quarter].float() / (2 * quarter)))
    idx = torch.arange(grid * grid)
    x, y = (idx % grid + 1).float(), (idx // grid + 1).float()
    angles = torch.cat([x[:, None] * f, y[:, None] * f], dim=-1)  # (patches, head_dim / 2)
    angles = torch.cat([angles, angles.new_zeros(1, angles.shape[1])])  # the class token
    return torch.cos(angles)[None], torch.sin(angles)[None]


class Attention(nn.Module):
    """Bidirectional multi-head attention with biases and the 2-D rotary embedding (pairs layout)."""

    def __init__(self, width: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.wq = nn.Linear(width, width, bias=True)
        self.wk = nn.Linear(width, width, bias=True)
        self.wv = nn.Linear(width, width, bias=True)
        self.wo = nn.Linear(width, width, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, L, W = x.shape
        q, k, v = (w(x).view(B, L, self.n_heads, -1) for w in (self.wq, self.wk, self.wv))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.wo(out.transpose(1, 2).reshape(B, L, W))


class FeedForward(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden, bias=True)
        self.c_proj = nn.Linear(hidden, width, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class TransformerBlock(nn.Module):
    def __init__(self, c: Llama4VisionConfig) -> None:
        super().__init__()
        self.attn = Attention(c.width, c.n_heads)
        self.ln_1 = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.mlp = FeedForward(c.width, int(c.mlp_ratio * c.width))
        self.ln_2 = nn.LayerNorm(c.width, eps=c.norm_eps)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.ln_1(x), cos, sin)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, c: Llama4VisionConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(TransformerBlock(c) for _ in range(c.n_layers))

    def forward(self, x, cos, sin):
        for block in self.resblocks:
            x = block(x, cos, sin)
        return x


class VisionEncoder(nn.Module):
    """Tiles (N, 3, S, S) -> (N, patches, width): patches, a class token appended last, position embedding,
    pre-norm, the layers, post-norm, class token dropped."""

    def __init__(self, c: Llama4VisionConfig) -> None:
        super().__init__()
        self.config = c
        grid = c.image_size // c.patch_size
        self.conv1 = nn.Module()  # Meta's ColumnParallelConv2dPatch: unfold, then a linear map (no bias)
        self.conv1._linear = nn.Linear(3 * c.patch_size**2, c.width, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(c.width))
        self.positional_embedding_vlm = nn.Parameter(torch.zeros(grid * grid + 1, c.width))
        self.ln_pre = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.ln_post = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.transformer = Transformer(c)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        c = self.config
        N = tiles.shape[0]
        x = F.unfold(tiles, c.patch_size, stride=c.patch_size).transpose(1, 2)  # (N, patches, 3*p*p)
        x = self.conv1._linear(x)
        x = torch.cat([x, self.class_embedding.expand(N, 1, c.width)], dim=1) + self.positional_embedding_vlm
        x = self.ln_pre(x)
        cos, sin = rope_2d(c)
        x = self.transformer(x, cos.to(x.device), sin.to(x.device))
        return self.ln_post(x)[:, :-1]


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """(N, g*g, C) -> (N, (g*r)^2, C / r^2): neighbouring patches folded into channels (llama-models
    `pixel_shuffle_op`: two transposed reshapes, columns first)."""
    N, P, C = x.shape
    g = int(P**0.5)
    x = x.view(N, g, int(g * ratio), int(C / ratio)).permute(0, 2, 1, 3)
    x = x.reshape(N, int(g * ratio), int(g * ratio), int(C / ratio**2)).permute(0, 2, 1, 3)
    return x.reshape(N, -1, x.shape[-1])


class SimpleMLP(nn.Module):
    """gelu(c_proj(gelu(c_fc x))), no biases (llama-models `SimpleMLP` as `PixelShuffleMLP` builds it)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden, bias=False)
        self.c_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.c_proj(F.gelu(self.c_fc(x))))


class PixelShuffleMLP(nn.Module):
    def __init__(self, c: Llama4VisionConfig) -> None:
        super().__init__()
        self.ratio = c.pixel_shuffle_ratio
        self.mlp = SimpleMLP(int(c.width / c.pixel_shuffle_ratio**2), c.output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(pixel_shuffle(x, self.ratio))


class VisionEmbeddings(nn.Module):
    def __init__(self, c: Llama4VisionConfig) -> None:
        super().__init__()
        self.vision_encoder = VisionEncoder(c)
        self.vision_adapter = PixelShuffleMLP(c)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.vision_adapter(self.vision_encoder(tiles))


class Llama4Vision(nn.Module):
    """Tiles (N, 3, S, S) -> image features (N, tokens_per_tile, dim) for the <|patch|> tokens of the prompt.

    Registered under the Llama 4 model's own names: `vision_embeddings.*` and `vision_projection.weight`.
    """

    def __init__(self, c: Llama4VisionConfig, dim: int) -> None:
        super().__init__()
        self.vision_embeddings = VisionEmbeddings(c)
        self.vision_projection = nn.Linear(c.output_dim, dim, bias=False)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.vision_projection(self.vision_embeddings(tiles))


@dataclass
class ImageFeatures:
    """A request's projected image features (n, dim), one row per <|patch|> token of its prompt, in order."""

    features: torch.Tensor
    patch_id: int

    def merge(self, tokens: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The embeddings with the patch tokens' replaced; a call without patch tokens (a decoding step) is left
        as it is, one with patch tokens must hold all of them (the whole prompt)."""
        if not bool((tokens == self.patch_id).any()):
            return h
        return merge_image_features(h, tokens, self.patch_id, self.features)


def merge_image_features(h: torch.Tensor, tokens: torch.Tensor, patch_id: int, features: torch.Tensor) -> torch.Tensor:
    """Token embeddings h (B, T, dim) with those of the <|patch|> tokens replaced, in order, by the rows of
    features (n, dim) (llama-models `scatter_embeddings` and `Transformer.forward`: h * ~mask + image * mask)."""
    mask = (tokens == patch_id)[..., None]  # (B, T, 1)
    n = int(mask.sum())
    if n != features.shape[0]:
        raise ValueError(f"{n} <|patch|> tokens but {features.shape[0]} image feature rows")
    return h.masked_scatter(mask, features.to(h.dtype))


@dataclass
class PromptFeatures:
    """One request's image features (n, dim) with the prompt positions (n,) of the <|patch|> tokens they fill."""

    features: torch.Tensor
    positions: torch.Tensor


@dataclass
class BatchFeatures:
    """Image features for one forward over any window of several prompts (the serving engine's chunked prefill
    and batched decoding): row b's token at position p is replaced by rows[b]'s feature for p, if it has one.

    Speaks ImageFeatures' `merge`; positions (B, T) are the forward's. A <|patch|> id at a position that holds
    no image feature (generated, or a row without images) keeps its embedding.
    """

    rows: list[PromptFeatures | None]
    positions: torch.Tensor
    patch_id: int

    def merge(self, tokens: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        out = h
        for b, row in enumerate(self.rows):
            if row is None or row.positions.numel() == 0:
                continue
            pos = self.positions[b]  # (T,)
            slot = torch.searchsorted(row.positions, pos).clamp(max=row.positions.numel() - 1)
            hit = (row.positions[slot] == pos) & (tokens[b] == self.patch_id)
            if bool(hit.any()):
                out = out.clone() if out is h else out
                out[b, hit] = row.features[slot[hit]].to(h.dtype)
        return out
