"""Llama 3.2 Vision: a Llama 3.1 decoder with gated cross-attention layers reading a tiled ViT's image tokens.

The math and parameter names of llama-models `llama3/multimodal/model.py` (`CrossAttentionTransformer`,
`CrossAttentionTransformerText`, `CrossAttentionTransformerBlock`, `CrossAttention`); the self-attention
layers are the Llama decoder's own blocks. The image keys and values of every cross-attention layer are
computed once per request (`image_context`) and reused at every decoding step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .cache import KVCache
from .llama import FeedForward, RMSNorm, TransformerBlock, VocabProjection, attention_mask, sdpa
from .rope import Frequencies, default_positions, rope_angles
from .vision_mllama import VisionModel

# Meta's text model keeps 8 trainable embedding rows after the vocabulary (`learnable_embedding`); the first is
# the image token of the model's input (llama-models `llama3/chat_format.py` writes 128256 = vocab_size for
# `<|image|>`, as transformers' MllamaConfig.image_token_index does).
N_LEARNABLE_EMBEDDINGS = 8
OPEN_END = 2**62  # "visible to every later token", as a span end


def fusion_schedule(n_layers: int, n_cross: int) -> list[int]:
    """Text layers that get a cross-attention layer before them: n_cross of them spread evenly, ending at the
    last layer (llama-models `CrossAttentionTransformerText._init_fusion_schedule`)."""
    k = math.ceil(n_layers / n_cross)
    return list(range(n_layers))[::-1][::k][:n_cross][::-1]


def image_spans(tokens: list[int], image_token: int) -> list[tuple[int, int]]:
    """[start, end) token positions that see each image, in the order of the image tokens.

    llama-models `llama3/chat_format.py::create_vision_mask`: an image is seen from its own token until the next
    image's token; a run of adjacent image tokens is seen together; the last image is seen by all later tokens,
    generated ones included (Meta's helper ends multi-image spans at the prompt's end; transformers, whose
    processor marks the end -1 and repeats the last row while generating, is followed here).
    """
    locs = [i for i, t in enumerate(tokens) if t == image_token]
    spans = [[a, b] for a, b in zip(locs, locs[1:])] + ([[locs[-1], OPEN_END]] if locs else [])
    last_end = OPEN_END
    for span in reversed(spans):
        if span[0] == span[1] - 1:
            span[1] = last_end
        last_end = span[1]
    return [(a, b) for a, b in spans]


@dataclass
class ImageContext:
    """What the decoder needs of a request's images, computed once (`Transformer.image_context`).

    kv: per cross-attention layer, normalised keys and values (B, n_kv_heads, S, head_dim), S = images x tiles
    x tokens per tile. key_ok: (B, S) keys of real tiles of real images. spans: (B, images, 2) positions
    [start, end) that see each image. tokens_per_image: S / images. rows: which rows of the forward's batch these
    B rows are (the others see no image: their cross-attention layers are skipped); None: all of them, in order.
    """

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    key_ok: torch.Tensor
    spans: torch.Tensor
    tokens_per_image: int
    rows: torch.Tensor | None = None

    @staticmethod
    def stack(rows: Sequence[ImageContext | None]) -> ImageContext:
        """One context for a batch whose row i reads `rows[i]`'s images (each a one-row context); a None row sees
        no image and takes no room. Rows with fewer images are padded with images that no position sees and whose
        keys are masked, so every row's cross-attention is its own (the serving engine batches requests so)."""
        held = [r for r in rows if r is not None]
        n_img = max(r.spans.shape[1] for r in held)
        S = n_img * held[0].tokens_per_image

        def padded(t: torch.Tensor, dim: int) -> torch.Tensor:
            return F.pad(t, [0, 0] * (t.dim() - 1 - dim) + [0, S - t.shape[dim]])

        kv = [(torch.cat([padded(r.kv[i][0], 2) for r in held]), torch.cat([padded(r.kv[i][1], 2) for r in held]))
              for i in range(len(held[0].kv))]
        spans = held[0].spans.new_zeros(len(held), n_img, 2)  # [0, 0): seen by no position
        for b, r in enumerate(held):
            spans[b, : r.spans.shape[1]] = r.spans[0]
        index = [b for b, r in enumerate(rows) if r is not None]
        return ImageContext(kv=kv, key_ok=torch.cat([padded(r.key_ok, 1) for r in held]), spans=spans,
                            tokens_per_image=held[0].tokens_per_image,
                            rows=None if len(index) == len(rows) else torch.tensor(index, device=spans.device))

    def row(self, b: int, n_images: int) -> ImageContext:
        """Row b's first n_images images as a one-row context viewing this one's tensors (no copy)."""
        S = n_images * self.tokens_per_image
        return ImageContext(kv=[(k[b : b + 1, :, :S], v[b : b + 1, :, :S]) for k, v in self.kv],
                            key_ok=self.key_ok[b : b + 1, :S], spans=self.spans[b : b + 1, :n_images],
                            tokens_per_image=self.tokens_per_image)

    def masks(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For queries at the forward's positions (its rows with images, when `rows` says which): the key mask
        (B, 1, T, S) and the row gate (B, 1, T, 1).

        A token that sees no image gets a zero row gate (Meta's `full_text_row_masked_out_mask`): its
        cross-attention output and the cross layer's feed-forward are multiplied by it. Such rows attend to every
        key (a finite softmax whose result the gate discards), as Meta's zeroed bias rows do.
        """
        pos = (positions if self.rows is None else positions[self.rows])[:, :, None]  # (B, T, 1)
        sees = (pos >= self.spans[:, None, :, 0]) & (pos < self.spans[:, None, :, 1])  # (B, T, images)
        allowed = sees.repeat_interleave(self.tokens_per_image, dim=2) & self.key_ok[:, None, :]  # (B, T, S)
        row = allowed.any(-1, keepdim=True)  # (B, T, 1)
        allowed = allowed | ~row
        return allowed[:, None], row[:, None].to(self.kv[0][0].dtype)


class CrossAttention(nn.Module):
    """Text queries over image keys/values; per-head RMSNorm on queries and keys; grouped like the trunk."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps)

    def image_kv(self, image_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, dim) projected image tokens -> keys, values (B, n_kv_heads, S, head_dim)."""
        B, S, _ = image_tokens.shape
        k = self.k_norm(self.wk(image_tokens).view(B, S, self.n_kv_heads, self.head_dim))
        v = self.wv(image_tokens).view(B, S, self.n_kv_heads, self.head_dim)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, kv, mask, row) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.wq(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)  # (B, H, T, D)
        out = sdpa(q, kv[0], kv[1], mask) * row
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class CrossAttentionTransformerBlock(nn.Module):
    """h = x + tanh(gate_attn) * xattn(norm x); h + tanh(gate_ffwd) * row * ffn(norm h)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention = CrossAttention(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.gate_attn = nn.Parameter(torch.zeros(1))
        self.feed_forward = FeedForward(config.dim, config.hidden_dim)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.gate_ffwd = nn.Parameter(torch.zeros(1))

    def forward(self, x, kv, mask, row) -> torch.Tensor:
        h = x + self.gate_attn.tanh() * self.attention(self.attention_norm(x), kv, mask, row)
        return h + self.gate_ffwd.tanh() * (row[:, 0] * self.feed_forward(self.ffn_norm(h)))


class TextModel(nn.Module):
    """The decoder: Llama blocks, with a cross-attention block before each layer of the fusion schedule."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        assert config.vision is not None
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.learnable_embedding = nn.Embedding(N_LEARNABLE_EMBEDDINGS, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.fusion_schedule = fusion_schedule(config.n_layers, config.vision.n_cross_attention_layers)
        self.cross_attention_layers = nn.ModuleList(
            CrossAttentionTransformerBlock(config) for _ in self.fusion_schedule
        )
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Ids below vocab_size read tok_embeddings, the 8 above it learnable_embedding."""
        V = self.config.vocab_size
        text = self.tok_embeddings(tokens.clamp(max=V - 1))
        extra = self.learnable_embedding((tokens - V).clamp(min=0, max=N_LEARNABLE_EMBEDDINGS - 1))
        return torch.where((tokens >= V)[..., None], extra.to(text.dtype), text)


class Transformer(nn.Module):
    """Token ids (B, T) and optionally an ImageContext -> float32 logits (B, T, vocab).

    Arguments as `llama.Transformer.forward`, plus `images`. Without images the cross-attention layers are
    skipped (Meta's `text_only_inference`; transformers skips them likewise).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.vision is None:
            raise ValueError("the mllama architecture needs ModelConfig.vision")
        self.config = config
        self.vision_model = VisionModel(config.vision, config.dim)
        self.text_model = TextModel(config)
        self.freqs = Frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        self.project = VocabProjection()

    @property
    def image_token_id(self) -> int:
        return self.config.vocab_size

    def output_weight(self) -> torch.Tensor:
        return self.text_model.output.weight

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype = torch.float32) -> KVCache:
        """The self-attention cache (cross-attention keys live in the ImageContext)."""
        return KVCache.for_model(self.config, batch, max_len, dtype=dtype, device=self.text_model.norm.weight.device)

    @torch.no_grad()
    def image_context(
        self, tokens: torch.Tensor, tiles: torch.Tensor, aspect_ratios: torch.Tensor
    ) -> ImageContext:
        """Encode the images once and project them to every cross-attention layer's keys and values.

        tokens (B, T): the prompt, whose image tokens (id vocab_size) place the images. tiles
        (B, images, max_tiles, 3, S, S) and aspect_ratios (B, images, 2) as `llamaherd.image` makes them
        (absent tiles zero). The number of images per row must equal its number of image tokens.
        """
        B, n_img, T = tiles.shape[:3]
        spans = torch.zeros(B, n_img, 2, dtype=torch.long, device=tokens.device)
        for b in range(B):
            row = image_spans(tokens[b].tolist(), self.image_token_id)
            if len(row) != n_img:
                raise ValueError(f"{len(row)} image tokens in row {b} but {n_img} images")
            spans[b] = torch.tensor(row, dtype=torch.long)
        feats = self.vision_model(tiles.flatten(0, 1), aspect_ratios.flatten(0, 1))  # (B*n_img, T, ntok, dim)
        ntok = feats.shape[2]
        feats = feats.reshape(B, n_img * T * ntok, -1)
        n_tiles = aspect_ratios[..., 0] * aspect_ratios[..., 1]  # (B, n_img)
        tile_ok = torch.arange(T, device=tiles.device) < n_tiles[..., None]  # (B, n_img, T)
        key_ok = tile_ok[..., None].expand(B, n_img, T, ntok).reshape(B, -1)
        kv = [layer.attention.image_kv(feats) for layer in self.text_model.cross_attention_layers]
        return ImageContext(kv=kv, key_ok=key_ok, spans=spans, tokens_per_image=T * ntok)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        key_mask: torch.Tensor | None = None,
        last_only: bool = False,
        images: ImageContext | None = None,
    ) -> torch.Tensor:
        text = self.text_model
        T = tokens.shape[1]
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = default_positions(tokens, start)
        cos, sin = rope_angles(positions, self.freqs.on(tokens.device))
        mask = attention_mask(start, T, key_mask, tokens.device)
        xmask, row = images.masks(positions) if images is not None else (None, None)
        h = text.embed(tokens)
        cross = dict(zip(text.fusion_schedule, text.cross_attention_layers))
        for i, layer in enumerate(text.layers):
            if images is not None and i in cross:
                kv = images.kv[text.fusion_schedule.index(i)]
                if images.rows is None:
                    h = cross[i](h, kv, xmask, row)
                else:  # only the rows that have images: the others skip the layer, as text-only inference does
                    h = h.index_copy(0, images.rows, cross[i](h[images.rows], kv, xmask, row))
            h = layer(h, cos, sin, mask, cache, i, start)
        if cache is not None:
            cache.length = start + T
        if last_only:
            h = h[:, -1:]
        return self.project(text.norm(h), self.output_weight())
