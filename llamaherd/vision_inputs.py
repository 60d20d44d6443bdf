"""A request's images into a vision model: image parts of chat messages, the image token, and the model with the
request's encoded images bound to it (so the text engine runs it unchanged)."""

from __future__ import annotations

import re
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


class WithImages(nn.Module):
    """The model with one request's images bound: `forward(tokens, **kw)` is `net(tokens, images=context, **kw)`,
    with the tokenizer's image token mapped to the model's (Meta's chat format does the same mapping)."""

    def __init__(self, net: nn.Module, context, token_id: int | None) -> None:
        super().__init__()
        self.net = net
        self.context = context
        self.config = net.config
        self.token_id = token_id

    def _model_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.token_id is None or self.token_id == self.net.image_token_id:
            return tokens
        return torch.where(tokens == self.token_id, torch.full_like(tokens, self.net.image_token_id), tokens)

    def forward(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.net(self._model_ids(tokens), images=self.context, **kwargs)


def bind_images(net: nn.Module, tokenizer, token_ids: list[int], images: list[Any]) -> nn.Module:
    """`net` ready for a prompt whose image tokens stand for `images`: the images are read, tiled and encoded,
    and every cross-attention layer's keys/values computed, once. Mismatched counts, too many images, or images
    for a text-only model raise ImageError."""
    from .config import Llama4VisionConfig
    from .image import mllama_batch

    if getattr(net, "config", None) is None or net.config.vision is None:
        raise ImageError("this model reads no images (text-only); remove the image or load a vision model")
    if len(images) > MAX_IMAGES:
        raise ImageError(f"{len(images)} images in one request; at most {MAX_IMAGES} are accepted")
    if isinstance(net.config.vision, Llama4VisionConfig):
        return _bind_llama4(net, tokenizer, token_ids, images)
    tok = image_token_id(tokenizer)
    marks = sum(1 for t in token_ids if t in (tok, net.image_token_id))
    if marks != len(images):
        raise ImageError(f"the prompt has {marks} image tokens ({IMAGE_LITERAL}) but {len(images)} images were "
                         "given; give one image per image token")
    v = net.config.vision
    device = next(net.parameters()).device
    dtype = next(net.parameters()).dtype
    tiles, grids = mllama_batch(images, v.image_size, v.max_num_tiles)
    wrapper = WithImages(net, None, tok)
    ids = wrapper._model_ids(torch.tensor([token_ids], device=device))
    wrapper.context = net.image_context(ids, tiles.to(device=device, dtype=dtype), grids.to(device))
    return wrapper


def _bind_llama4(net: nn.Module, tokenizer, token_ids: list[int], images: list[Any]) -> nn.Module:
    """Llama 4: every image's tiles (global tile included) encoded at once; the features fill the prompt's
    <|patch|> tokens in order (the prompt's layout comes from `image.llama4_image_layout`)."""
    from .image import llama4_tiles, load_image
    from .model.vision_llama4 import ImageFeatures

    try:
        patch = tokenizer.special_id("<|patch|>")
    except Exception:  # no tokenizer, or one without Llama 4's image tokens
        raise ImageError("images for a Llama 4 model need its tokenizer (with <|patch|>)") from None
    v = net.config.vision
    param = next(net.parameters())
    tiles = torch.cat([llama4_tiles(load_image(im, background=(255, 255, 255)), v.image_size)[0] for im in images])
    with torch.no_grad():
        feats = net.vision_projection(net.vision_embeddings(tiles.to(device=param.device, dtype=param.dtype)))
    feats = feats.reshape(-1, net.config.dim)
    n = sum(1 for t in token_ids if t == patch)
    if n != feats.shape[0]:
        raise ImageError(f"the prompt has {n} <|patch|> tokens but the images make {feats.shape[0]}; lay each image "
                         "out with its own tiles (image.llama4_image_layout)")
    return WithImages(net, ImageFeatures(feats, patch), None)


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
