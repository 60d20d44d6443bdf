"""Llama 4 image inputs against Meta's chat format (llama-models llama4/chat_format.py `encode_content` with its
VariableSizeImageTransform / ResizeNormalizeImageTransform): the tiles (global tile included) and the special
tokens an image occupies, on generated images of several shapes and modes."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from llamaherd.image import llama4_image_layout, llama4_tiles, load_image
from llamaherd.tokenizer import Tokenizer

from .vision_fixtures import import_torchvision


def _png(w: int, h: int, mode: str, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    bands = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = torch.randint(0, 256, (h, w, bands), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if bands == 1 else arr, mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def meta_format():
    import_torchvision()
    from llama_models.llama4.args import Size, VisionArgs
    from llama_models.llama4.chat_format import ChatFormat
    from llama_models.llama4.tokenizer import Tokenizer as MetaTokenizer

    args = VisionArgs(image_size=Size(height=336, width=336), patch_size=Size(height=14, width=14), dim=1408,
                      n_layers=34, n_heads=16, mlp_ratio=4.0, output_dim=4096, pixel_shuffle_ratio=0.5)
    return ChatFormat(MetaTokenizer.get_instance(), vision_args=args)


# (width, height, mode): one tile, wide and tall grids, many tiles, tiny, grayscale, alpha (composited on white).
SHAPES = [(200, 150, "RGB"), (700, 300, "RGB"), (300, 1200, "L"), (1500, 1400, "RGB"), (3, 2, "RGB"),
          (500, 400, "RGBA"), (2000, 90, "RGB")]


@pytest.mark.parametrize("w,h,mode", SHAPES)
def test_tiles_and_tokens_equal_meta(meta_format, w, h, mode):
    from llama_models.datatypes import RawMediaItem

    data = _png(w, h, mode, seed=w + h)
    tokens, images = meta_format._encode_content([RawMediaItem(data=data)], bos=True)  # keeps the aspect ratio
    meta_image = images[0]
    tiles, grid = llama4_tiles(load_image(data, background=(255, 255, 255)), 336, 16)
    assert grid == tuple(meta_image.aspect_ratio)
    torch.testing.assert_close(tiles, meta_image.image_tiles, atol=0, rtol=0)
    tok = Tokenizer.llama4()
    ids = [tok.special_id("<|begin_of_text|>")] + [tok.special_id(t) for t in
                                                   llama4_image_layout(grid, tiles.shape[0], 144)]
    assert ids == tokens


@pytest.mark.parametrize("shapes", [[(200, 150, "RGB")], [(700, 300, "RGB"), (90, 500, "RGBA")]])
def test_dialog_with_images_equals_meta_encoder(meta_format, shapes):
    """Our llama4 chat format renders image parts as Meta's `encode_dialog_prompt` does (layout per image)."""
    import base64

    from llama_models.datatypes import RawMediaItem, RawMessage, RawTextItem

    from llamaherd.chat import get_format

    datas = [_png(w, h, mode, seed=i) for i, (w, h, mode) in enumerate(shapes)]
    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(d).decode()}}
             for d in datas]
    ours = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": parts + [{"type": "text", "text": "What differs?"}]}]
    meta = [RawMessage(role="system", content="Be brief."),
            RawMessage(role="user", content=[RawMediaItem(data=d) for d in datas] + [RawTextItem(text="What differs?")])]
    expected = meta_format.encode_dialog_prompt(meta).tokens
    assert get_format("llama4", Tokenizer.llama4(), images=True).encode_dialog(ours) == expected
