"""A request's images into a vision model: image parts of chat messages, the image token, and the model with the
request's encoded images bound to it (so the text engine runs it unchanged)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ImageError
from .image import image_source

MAX_IMAGES = 8  # per request; each Llama 3.2 Vision image is up to 4 x 1601 cross-attention keys per layer
IMAGE_LITERAL = "<|image|>"


def message_images(messages: list[dict]) -> list[Any]:
    """The image sources of OpenAI-shaped messages, in order: `{"type": "image_url", "image_url": {"url": ...}}`
    (data: URLs or local paths) and `{"type": "image", "image": <path, bytes or PIL image>}` parts."""
    out = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            source = image_source(part)
            if source is not None:
                out.append(source)
    return out


def image_token_id(tokenizer) -> int | None:
    """The tokenizer's id of `<|image|>` (Meta's tiktoken file: 128011; Hugging Face's tokenizer.json: 128256)."""
    if tokenizer is None:
        return None
    try:
        return tokenizer.special_id(IMAGE_LITERAL)
    except Exception:  # the tokenizer's own error type: it has no image token
        return None


# The tokens that stand for image content in a prompt (Llama 3.2 Vision, Llama 4): never generated text.
PLACEHOLDER_LITERALS = (IMAGE_LITERAL, "<|patch|>", "<|image_start|>", "<|image_end|>", "<|tile_x_separator|>",
                        "<|tile_y_separator|>")


def placeholder_ids(tokenizer) -> frozenset[int]:
    """The tokenizer's ids of the image placeholder tokens it has (speculative decoding never proposes them)."""
    ids = set()
    for literal in PLACEHOLDER_LITERALS if tokenizer is not None else ():
        try:
            ids.add(tokenizer.special_id(literal))
        except Exception:  # the tokenizer's own error type: it has no such token
            continue
    return frozenset(ids)


class WithImages(nn.Module):
    """The model with one request's images bound: `forward(tokens, **kw)` is `net(tokens, images=context, **kw)`,
    with the tokenizer's image token mapped to the model's (Meta's chat format does the same mapping)."""

    def __init__(self, net: nn.Module, context, token_id: int | None) -> None:
        super().__init__()
        self.net = net
        self.context = context
        self.config = net.config
        self.token_id = token_id

    def forward(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.net(model_ids(self.net, tokens, self.token_id), images=self.context, **kwargs)


def bind_images(net: nn.Module, tokenizer, token_ids: list[int], images: list[Any]) -> nn.Module:
    """`net` ready for a prompt whose image tokens stand for `images`: the images are read, tiled and encoded,
    and every cross-attention layer's keys/values computed, once. Mismatched counts, too many images, or images
    for a text-only model raise ImageError."""
    return prepare_images(net, tokenizer, token_ids, images).bind(net)


@dataclass(eq=False)
class PreparedImages:
    """A request's images read, checked and tiled for one model, not yet encoded.

    Reading and tiling are cheap next to the encoder, so they happen where the request arrives and a bad image
    is refused before anything runs; `encode` runs the vision encoder once (the serving engine calls it at the
    sequence's prefill, on its own thread) and keeps the result, which lives as long as the sequence holds it.
    """

    token_ids: list[int]  # the prompt, in the tokenizer's ids
    tiles: torch.Tensor | None  # dropped once encoded
    grids: torch.Tensor | None  # Llama 3.2 Vision's tile grids (1, n, 2); None for Llama 4
    token_id: int | None  # the tokenizer's <|image|> (Llama 3.2 Vision) or <|patch|> (Llama 4)
    digest: int  # of the tiles: salts the prefix cache's keys, so different images never share blocks
    kv_tokens: int = 0  # Llama 3.2 Vision: image keys per cross-attention layer (images x tiles x tokens per tile)
    _encoded: Any = None

    @property
    def early_fusion(self) -> bool:
        """Llama 4: image features replace <|patch|> embeddings (else: cross-attention, Llama 3.2 Vision)."""
        return self.grids is None

    def encode(self, net: nn.Module):
        """The encoded images, computed on the first call: an `ImageContext` (one row) for Llama 3.2 Vision, a
        `PromptFeatures` (features and the positions of the <|patch|> tokens they fill) for Llama 4."""
        if self._encoded is None:
            param = next(net.parameters())
            tiles = self.tiles.to(device=param.device, dtype=param.dtype)
            with torch.no_grad():
                if self.early_fusion:
                    from .model.vision_llama4 import PromptFeatures

                    feats = net.vision_projection(net.vision_embeddings(tiles)).reshape(-1, net.config.dim)
                    where = [i for i, t in enumerate(self.token_ids) if t == self.token_id]
                    self._encoded = PromptFeatures(feats, torch.tensor(where, dtype=torch.long, device=param.device))
                else:
                    ids = model_ids(net, torch.tensor([self.token_ids], device=param.device), self.token_id)
                    self._encoded = net.image_context(ids, tiles, self.grids.to(param.device))
            self.tiles = None
        return self._encoded

    def bind(self, net: nn.Module) -> nn.Module:
        """The model with these images bound (`WithImages`), for the simple generation path."""
        encoded = self.encode(net)
        if self.early_fusion:
            from .model.vision_llama4 import ImageFeatures

            return WithImages(net, ImageFeatures(encoded.features, self.token_id), None)
        return WithImages(net, encoded, self.token_id)


def model_ids(net: nn.Module, tokens: torch.Tensor, token_id: int | None) -> torch.Tensor:
    """Token ids as the model takes them: the tokenizer's <|image|> mapped to the model's (Llama 3.2 Vision)."""
    if token_id is None or token_id == net.image_token_id:
        return tokens
    return torch.where(tokens == token_id, torch.full_like(tokens, net.image_token_id), tokens)


def prepare_images(net: nn.Module, tokenizer, token_ids: list[int], images: list[Any]) -> PreparedImages:
    """Read, check and tile a request's images for `net` and its prompt `token_ids` (see `PreparedImages`).
    Unreadable images, mismatched counts, too many images, or images for a text-only model raise ImageError."""
    from .config import Llama4VisionConfig
    from .image import llama4_tiles, load_image, mllama_batch

    if getattr(net, "config", None) is None or net.config.vision is None:
        raise ImageError("this model reads no images (text-only); remove the image or load a vision model")
    if len(images) > MAX_IMAGES:
        raise ImageError(f"{len(images)} images in one request; at most {MAX_IMAGES} are accepted")
    v = net.config.vision
    token_ids = list(token_ids)
    if isinstance(v, Llama4VisionConfig):
        # Llama 4: every image's tiles (global tile included) are encoded at once; the features fill the prompt's
        # <|patch|> tokens in order (the prompt's layout comes from `image.llama4_image_layout`).
        try:
            patch = tokenizer.special_id("<|patch|>")
        except Exception:  # no tokenizer, or one without Llama 4's image tokens
            raise ImageError("images for a Llama 4 model need its tokenizer (with <|patch|>)") from None
        tiles = torch.cat([llama4_tiles(load_image(im, background=(255, 255, 255)), v.image_size)[0]
                           for im in images])
        n, made = sum(1 for t in token_ids if t == patch), tiles.shape[0] * v.tokens_per_tile
        if n != made:
            raise ImageError(f"the prompt has {n} <|patch|> tokens but the images make {made}; lay each image "
                             "out with its own tiles (image.llama4_image_layout)")
        return PreparedImages(token_ids, tiles, None, patch, _digest(tiles))
    tok = image_token_id(tokenizer)
    marks = sum(1 for t in token_ids if t in (tok, net.image_token_id))
    if marks != len(images):
        raise ImageError(f"the prompt has {marks} image tokens ({IMAGE_LITERAL}) but {len(images)} images were "
                         "given; give one image per image token")
    tiles, grids = mllama_batch(images, v.image_size, v.max_num_tiles)  # (1, images, tiles, 3, S, S)
    kv_tokens = tiles.shape[1] * tiles.shape[2] * v.tokens_per_tile  # as model/mllama.py image_context keeps them
    return PreparedImages(token_ids, tiles, grids, tok, _digest(tiles, grids), kv_tokens)


def _digest(*tensors: torch.Tensor) -> int:
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return int.from_bytes(h.digest(), "little") or 1  # 0 is "no images"


class BatchImages:
    """The serving engine's side: for one forward over several sequences, the model's token ids and its `images`
    argument, each row reading its own sequence's encoded images (None: a text-only row).

    Llama 3.2 Vision rows with images are stacked into one `ImageContext` (padded to the most images; text-only
    rows take no room and skip the cross-attention layers). The stack is kept while the same sequences decode
    together, so it is built once per batch composition, not per step, and each sequence's own context then views
    its row of the stack: its keys and values are held once, not twice.
    """

    def __init__(self) -> None:
        self._rows: tuple = ()
        self._stacked = None

    def inputs(self, net: nn.Module, rows: Sequence[PreparedImages | None], tokens: torch.Tensor,
               positions: torch.Tensor) -> tuple[torch.Tensor, Any]:
        encoded = [r.encode(net) if r is not None else None for r in rows]
        some = next(r for r in rows if r is not None)
        if some.early_fusion:
            from .model.vision_llama4 import BatchFeatures

            return tokens, BatchFeatures(encoded, positions, some.token_id)
        tokens = torch.stack([model_ids(net, t, r.token_id) if r is not None else t for t, r in zip(tokens, rows)])
        if len(rows) == 1:
            return tokens, encoded[0]
        if len(self._rows) != len(encoded) or any(a is not b for a, b in zip(self._rows, encoded)):
            from .model.mllama import ImageContext

            self._stacked = stacked = ImageContext.stack(encoded)
            held = [r for r in rows if r is not None]
            for j, r in enumerate(held):  # the sequence's own copy is dropped for a view of its row
                r._encoded = stacked.row(j, r._encoded.spans.shape[1])
            self._rows = tuple(r._encoded if r is not None else None for r in rows)
        return tokens, self._stacked

    def forget(self) -> None:
        """Drop the kept stack (its sequences have finished)."""
        self._rows, self._stacked = (), None


def with_image_tokens(net: nn.Module, tokenizer, ids: list[int], n: int) -> list[int]:
    """A raw (base-model) prompt with n images: BOS, one <|image|> per image, then the text (transformers' mllama
    examples write "<|image|>" ahead of the text). Llama 4 lays an image out by its size, in its chat format."""
    from .config import Llama4VisionConfig

    if getattr(net, "config", None) is None or net.config.vision is None:
        raise ImageError("this model reads no images (text-only); remove the images or load a vision model")
    token = image_token_id(tokenizer)
    if isinstance(net.config.vision, Llama4VisionConfig) or token is None:
        raise ImageError("a raw prompt cannot carry images for this model: its image tokens are laid out by its chat "
                         "format; send the request without raw")
    head = 1 if ids and ids[0] == tokenizer.bos_id else 0
    return ids[:head] + [token] * n + ids[head:]


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp")
_PATH_WORD = re.compile(r"""'([^']+)'|"([^"]+)"|(\S+)""")


def user_content(text: str) -> str | list[dict]:
    """A typed chat line as message content: paths of existing image files in it become image parts ahead of the
    remaining text, as Ollama's REPL attaches them; a line without any stays plain text."""
    paths, words = [], []
    for m in _PATH_WORD.finditer(text):
        word = next(g for g in m.groups() if g is not None)
        candidate = Path(word).expanduser()
        if candidate.suffix.lower() in IMAGE_SUFFIXES and candidate.is_file():
            paths.append(str(candidate))
        else:
            words.append(m.group(0))
    if not paths:
        return text
    return [{"type": "image", "image": p} for p in paths] + [{"type": "text", "text": " ".join(words)}]
