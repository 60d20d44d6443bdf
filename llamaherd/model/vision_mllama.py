"""Llama 3.2 Vision's tiled ViT encoder: patches, tile and position embeddings, local and global layers.

The math of llama-models `llama3/multimodal/model.py` (`VisionEncoder`, `ImageTransformer`,
`TilePositionEmbedding`) and `encoder_utils.py`; parameter names are Meta's, with one deliberate change:
the aspect-ratio dependent embeddings are stored per supported aspect ratio (see `TilePositionEmbedding`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig


def supported_aspect_ratios(max_num_tiles: int) -> list[tuple[int, int]]:
    """Every (rows, cols) tile grid with rows * cols <= max_num_tiles, in a fixed order.

    The order is transformers' `get_all_supported_aspect_ratios` (its aspect-ratio ids are this index + 1),
    so HF checkpoints' per-ratio tables map row for row.
    """
    return [(r, c) for r in range(1, max_num_tiles + 1) for c in range(1, max_num_tiles + 1) if r * c <= max_num_tiles]


def aspect_ratio_index(aspect_ratios: torch.Tensor, max_num_tiles: int) -> torch.Tensor:
    """(N, 2) long (rows, cols) -> (N,) index into `supported_aspect_ratios(max_num_tiles)`."""
    table = torch.tensor(supported_aspect_ratios(max_num_tiles), device=aspect_ratios.device)  # (R, 2)
    hit = (aspect_ratios[:, None, :] == table[None]).all(-1)  # (N, R)
    if not bool(hit.any(-1).all()):
        raise ValueError(f"aspect ratios {aspect_ratios.tolist()} are not among {table.tolist()}")
    return hit.to(torch.int64).argmax(-1)


class ImageAttention(nn.Module):
    """Bidirectional multi-head attention over all tokens of all tiles of one image."""

    def __init__(self, width: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.wq = nn.Linear(width, width, bias=False)
        self.wk = nn.Linear(width, width, bias=False)
        self.wv = nn.Linear(width, width, bias=False)
        self.wo = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, W = x.shape
        q, k, v = (w(x).view(B, L, self.n_heads, -1).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L, D)
        return self.wo(out.transpose(1, 2).reshape(B, L, W))


class ImageFeedForward(nn.Module):
    """c_proj(gelu(c_fc x)), both with bias; GELU is the exact (erf) one, as torch's nn.GELU default."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden, bias=True)
        self.c_proj = nn.Linear(hidden, width, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class ImageTransformerBlock(nn.Module):
    """Pre-LayerNorm block; the global layers scale both branches by tanh of a learned gate."""

    def __init__(self, c: VisionConfig, gated: bool) -> None:
        super().__init__()
        self.attn = ImageAttention(c.width, c.n_heads)
        self.ln_1 = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.mlp = ImageFeedForward(c.width, int(c.mlp_ratio * c.width))
        self.ln_2 = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.gated = gated
        if gated:
            self.gate_attn = nn.Parameter(torch.zeros(1))
            self.gate_ffn = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.gated:
            x = x + self.gate_attn.tanh() * self.attn(self.ln_1(x), mask)
            return x + self.gate_ffn.tanh() * self.mlp(self.ln_2(x))
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class ImageTransformer(nn.Module):
    def __init__(self, c: VisionConfig, n_layers: int, gated: bool) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ImageTransformerBlock(c, gated) for _ in range(n_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, keep: tuple[int, ...] = ()):
        """x after all blocks, and the inputs of the blocks listed in `keep` stacked on a last axis."""
        kept = []
        for i, block in enumerate(self.resblocks):
            if i in keep:
                kept.append(x)
            x = block(x, mask)
        return x, (torch.stack(kept, dim=-1) if kept else None)


class TilePositionEmbedding(nn.Module):
    """One gated embedding per tile, chosen by the image's tile grid.

    Meta stores a (max_tiles, max_tiles, 1, width) grid and gives tile (i, j) of a rows x cols image the cell
    [i, j]; transformers stores one (max_tiles * width) row per supported aspect ratio. This table is the
    latter, (ratios, max_tiles, width): every Meta grid maps into it exactly (checkpoint/mllama.py), and
    HF rows that no grid can express (fine-tuned per ratio) still load.
    """

    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        n_ratios = len(supported_aspect_ratios(c.max_num_tiles))
        self.embedding = nn.Parameter(torch.zeros(n_ratios, c.max_num_tiles, c.width))
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
        # x: (N, tiles, tokens, width); ratio: (N,) index of each image's grid
        return x + self.embedding[ratio][:, :, None, :] * self.gate.tanh()


class VisionEncoder(nn.Module):
    """Tiles (N, max_tiles, 3, S, S) and grids (N, 2) -> features (N, max_tiles, tokens_per_tile, output_dim)."""

    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.config = c
        p = c.patch_size
        n_ratios = len(supported_aspect_ratios(c.max_num_tiles))
        # Meta's ColumnParallelConv2dPatch: unfold into patches, then a linear map (no bias).
        self.conv1 = nn.Module()
        self.conv1._linear = nn.Linear(3 * p * p, c.width, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(c.width))
        self.positional_embedding = nn.Parameter(torch.zeros(c.tokens_per_tile, c.width))
        # Per-ratio, per-tile position embeddings (Meta: a (tiles, tiles, tokens, width) grid; see above).
        self.gated_positional_embedding = nn.Parameter(
            torch.zeros(n_ratios, c.max_num_tiles, c.tokens_per_tile, c.width)
        )
        self.gated_positional_embedding_gate = nn.Parameter(torch.zeros(1))
        self.ln_pre = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.ln_post = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.transformer = ImageTransformer(c, c.n_layers, gated=False)
        self.global_transformer = ImageTransformer(c, c.n_global_layers, gated=True)
        self.pre_tile_pos_embed = TilePositionEmbedding(c)
        self.post_tile_pos_embed = TilePositionEmbedding(c)

    def forward(self, tiles: torch.Tensor, aspect_ratios: torch.Tensor) -> torch.Tensor:
        c = self.config
        N, T, C, S, _ = tiles.shape
        ratio = aspect_ratio_index(aspect_ratios, c.max_num_tiles)  # (N,)
        x = F.unfold(tiles.reshape(N * T, C, S, S), c.patch_size, stride=c.patch_size)  # (N*T, 3*p*p, P)
        x = self.conv1._linear(x.transpose(1, 2))  # (N*T, P, width)
        x = self.pre_tile_pos_embed(x.view(N, T, -1, c.width), ratio)
        cls = self.class_embedding.expand(N, T, 1, c.width)
        x = torch.cat([cls, x], dim=2)  # (N, T, ntok, width)
        gate = self.gated_positional_embedding_gate.tanh()
        x = x + self.positional_embedding * (1 - gate) + self.gated_positional_embedding[ratio] * gate
        x = self.ln_pre(x)

        # Each tile's tokens are padded to a multiple of 8 (Meta's `expand_num_tokens_to_mult8` always adds
        # 1..8; tokens_per_tile = g*g + 1 is never a multiple of 8, so transformers' count agrees).
        ntok = x.shape[2]
        npad = 8 - ntok % 8
        x = F.pad(x, (0, 0, 0, npad))  # (N, T, L, width), L = ntok + npad
        L = ntok + npad
        mask = self._attention_mask(aspect_ratios, T, ntok, L)
        x, kept = self.transformer(x.view(N, T * L, c.width), mask, keep=c.intermediate_layers)
        x = self.ln_post(x).view(N, T, L, c.width)
        x = self.post_tile_pos_embed(x, ratio)
        x, _ = self.global_transformer(x.view(N, T * L, c.width), mask)
        x = x.view(N, T, L, c.width)[:, :, :ntok]
        # Intermediate features: stacked on a last axis then flattened, so channels interleave (w * k + i).
        kept = kept.reshape(N, T, L, -1)[:, :, :ntok]
        return torch.cat([x, kept], dim=-1)  # (N, T, ntok, width * (1 + len(intermediate_layers)))

    @staticmethod
    def _attention_mask(aspect_ratios: torch.Tensor, T: int, ntok: int, L: int) -> torch.Tensor:
        """(N, 1, T*L, T*L) bool: Meta's `build_encoder_attention_mask`.

        Meta masks a pair only when both tokens are padding (padded tokens or tiles beyond the grid): real
        tokens also attend to padding. Reproduced as is; transformers does the same.
        """
        n_tiles = aspect_ratios[:, 0] * aspect_ratios[:, 1]  # (N,)
        tile_ok = torch.arange(T, device=aspect_ratios.device)[None, :] < n_tiles[:, None]  # (N, T)
        tok_ok = torch.arange(L, device=aspect_ratios.device) < ntok  # (L,)
        real = (tile_ok[:, :, None] & tok_ok[None, None, :]).reshape(-1, T * L)  # (N, T*L)
        return (real[:, :, None] | real[:, None, :])[:, None]


class VisionModel(nn.Module):
    """The encoder and the projection of its features to the text width (Meta's CrossAttentionTransformerVision)."""

    def __init__(self, c: VisionConfig, dim: int) -> None:
        super().__init__()
        self.vision_encoder = VisionEncoder(c)
        self.vision_projection = nn.Linear(c.output_dim, dim, bias=True)

    def forward(self, tiles: torch.Tensor, aspect_ratios: torch.Tensor) -> torch.Tensor:
        """(N, max_tiles, 3, S, S), (N, 2) -> (N, max_tiles, tokens_per_tile, dim)."""
        return self.vision_projection(self.vision_encoder(tiles, aspect_ratios))
