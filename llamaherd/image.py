"""Images for the vision models: reading (paths, bytes, data: URLs, PIL images) safely, tiling (best tile grid,
resize without distortion, pad, normalise, split) as llama-models `llama3/multimodal/image_transform.py` and
`llama4/preprocess.py` compute it, and the special tokens a Llama 4 image occupies.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import threading
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from .errors import ImageError

# Decompression bombs: an image whose header claims more pixels than this is refused before it is decoded
# (64 megapixels, 8192 x 8192; the largest canvas Llama 3.2 Vision uses is 1120 x 1120).
MAX_PIXELS = 8192 * 8192
MAX_BYTES = 64 * 1024 * 1024

# CLIP's normalisation, which Meta's Llama 3.2 Vision transform uses (llama-models image_transform.py `_mean`,
# `_std`); Llama 4's transforms use 0.5 for both (llama-models llama4/preprocess.py).
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
LLAMA4_MEAN = LLAMA4_STD = (0.5, 0.5, 0.5)

_DATA_URL = re.compile(r"^data:(image/[\w.+-]+)?(;[\w=.+-]+)*;base64,", re.IGNORECASE)


def _pil():
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImageError("reading images needs Pillow: pip install 'llamaherd[vision]'") from None
    return Image


def load_image(source: Any, *, max_pixels: int = MAX_PIXELS, background: tuple[int, int, int] | None = None):
    """An RGB PIL image from a PIL image, bytes, a data: URL, or a local path.

    EXIF orientation is applied (a phone photo stands as it was taken, as transformers' `load_image` does).
    Alpha is dropped as Meta's Llama 3 chat format does (`image.convert("RGB")`), or, with `background`, an RGBA
    image is composited on it as Meta's Llama 4 chat format does (`convert_image_to_rgb`, white). Remote
    http(s) URLs are refused: nothing is fetched. Corrupt, truncated or oversized images raise ImageError.
    """
    Image = _pil()
    if isinstance(source, Image.Image):
        image = source
    else:
        image = _open(_bytes_of(source), Image)
    w, h = image.size
    if w * h > max_pixels:
        raise ImageError(f"image of {w}x{h} pixels exceeds the limit of {max_pixels}; downscale it first")
    if w == 0 or h == 0:
        raise ImageError(f"image of {w}x{h} pixels is empty")
    if image is not source:
        _decode_strictly(image)  # only now, after the header's size passed
    try:
        from PIL import ImageOps

        image = ImageOps.exif_transpose(image)
        if background is not None and image.mode == "RGBA":
            flat = Image.new("RGB", image.size, background)
            flat.paste(image, mask=image.split()[3])
            return flat
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data surfaces at decode time
        raise ImageError(f"image data is corrupt or truncated ({exc}); re-export the image") from None


def image_source(part: Any) -> Any:
    """The image an OpenAI / Hugging Face content part carries, or None for any other part."""
    if not isinstance(part, dict):
        return None
    kind = part.get("type")
    if kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str):
            raise ImageError("an image_url part needs {'image_url': {'url': 'data:image/...;base64,...'}}")
        return url
    if kind == "image":
        if part.get("image") is None:
            raise ImageError("an image part needs {'image': <path, bytes or PIL image>}")
        return part["image"]
    return None


def data_url_bytes(url: str) -> bytes | None:
    """The bytes a `data:image/...;base64,` URL carries; None when `url` is not such a URL. Malformed base64
    raises ImageError."""
    if not _DATA_URL.match(url):
        return None
    try:
        return base64.b64decode(url[url.index(",") + 1 :], validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("the data: URL's base64 payload is malformed; encode the image bytes again") from None


def _bytes_of(source: Any) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, str) and _DATA_URL.match(source):
        data = data_url_bytes(source)
    elif isinstance(source, str) and re.match(r"^[a-z][a-z0-9+.-]*://", source, re.IGNORECASE):
        raise ImageError(
            f"remote image URLs are refused ({source.split('://')[0]}://...): nothing is downloaded; pass a local"
            " path, the bytes, or a data:image/...;base64 URL"
        )
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{path}: no such image file")
        if path.stat().st_size > MAX_BYTES:
            raise ImageError(f"{path}: larger than {MAX_BYTES} bytes; downscale or recompress it")
        data = path.read_bytes()
    else:
        raise ImageError(f"an image must be a path, bytes, a data: URL or a PIL image, not {type(source).__name__}")
    if len(data) > MAX_BYTES:
        raise ImageError(f"image data larger than {MAX_BYTES} bytes; downscale or recompress it")
    return data


def _open(data: bytes, Image):
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))  # reads the header only
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(f"image refused as a decompression bomb ({exc})") from None
        except (OSError, ValueError, SyntaxError) as exc:  # UnidentifiedImageError is an OSError
            raise ImageError(f"not a readable image ({exc}); send PNG, JPEG, GIF, BMP or WebP data") from None
    return image


_STRICT = threading.Lock()


def _decode_strictly(image) -> None:
    """Decode the pixels now, refusing truncated data even where another library has set Pillow's
    process-wide `ImageFile.LOAD_TRUNCATED_IMAGES` (llama-models' `llama4/preprocess.py` does so on import,
    after which Pillow pads a truncated image with grey and says nothing)."""
    from PIL import ImageFile

    with _STRICT:
        lenient, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            image.load()
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageError(f"image data is corrupt or truncated ({exc}); re-export the image") from None
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = lenient


# -- Llama 3.2 Vision tiling -----------------------------------------------------------------------------


def canvas_options(max_num_tiles: int, tile: int) -> list[tuple[int, int]]:
    """Tile grids of up to max_num_tiles tiles, in pixels, in Meta's order (`find_supported_resolutions`:
    tile counts from the most down, factor pairs ascending, grouped by aspect ratio in first-seen order); the
    order decides ties."""
    by_ratio: dict[float, list[tuple[int, int]]] = defaultdict(list)
    for n in range(max_num_tiles, 0, -1):
        for f in sorted({d for i in range(1, int(n**0.5) + 1) if n % i == 0 for d in (i, n // i)}):
            by_ratio[f / (n // f)].append((f, n // f))
    return [(a * tile, b * tile) for group in by_ratio.values() for a, b in group]


def best_canvas(width: int, height: int, max_num_tiles: int, tile: int) -> tuple[int, int]:
    """(canvas width, canvas height): the smallest upscale if one exists, else the mildest downscale; among
    equal scales the smallest area (Meta's `get_best_fit`, in float32 as it computes)."""
    options = torch.tensor(canvas_options(max_num_tiles, tile))
    scale_w = options[:, 0] / width
    scale_h = options[:, 1] / height
    scales = torch.where(scale_w > scale_h, scale_h, scale_w)  # the limiting side
    up = scales[scales >= 1]
    chosen = up.min() if len(up) else scales[scales < 1].max()
    candidates = options[scales == chosen]
    best = candidates[torch.argmin(candidates[:, 0] * candidates[:, 1])]
    return int(best[0]), int(best[1])


def fit_without_distortion(width: int, height: int, target_w: int, target_h: int) -> tuple[int, int]:
    """The largest (w, h) with the image's aspect ratio inside the target, at least one pixel each (Meta's
    `get_max_res_without_distortion`; the Llama 4 transform adds the one-pixel floor, where Llama 3's would
    ask for an empty image and fail)."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return target_w, max(min(math.floor(height * scale_w), target_h), 1)
    return max(min(math.floor(width * scale_h), target_w), 1), target_h


def _normalized(image, mean, std) -> torch.Tensor:
    """An RGB PIL image -> (3, H, W) float32, scaled to [0, 1] then normalised (torchvision to_tensor, normalize)."""
    w, h = image.size
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(h, w, 3)
    x = pixels.permute(2, 0, 1).float().div(255)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def mllama_tiles(image, tile: int, max_num_tiles: int, mean=MEAN, std=STD) -> tuple[torch.Tensor, tuple[int, int]]:
    """An RGB PIL image -> normalised tiles (rows * cols, 3, tile, tile) in row-major order and (rows, cols).

    The image is scaled to fit its best canvas without distortion, but upscaled at most to one tile's side;
    it is pasted at the top left of a black canvas; the canvas is normalised and cut into tiles.
    """
    w, h = image.size
    canvas_w, canvas_h = best_canvas(w, h, max_num_tiles, tile)
    # Never upscale past one tile's side (Meta's max_upscaling_size when resize_to_max_canvas is off).
    target_w, target_h = min(max(w, tile), canvas_w), min(max(h, tile), canvas_h)
    new_w, new_h = fit_without_distortion(w, h, target_w, target_h)
    Image = _pil()
    resized = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (canvas_w, canvas_h), (0, 0, 0))
    canvas.paste(resized)
    x = _normalized(canvas, mean, std)  # (3, H, W)
    rows, cols = canvas_h // tile, canvas_w // tile
    x = x.view(3, rows, tile, cols, tile).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, tile, tile)
    return x.contiguous(), (rows, cols)


def mllama_batch(images: list, tile: int, max_num_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images -> the model's inputs for one request: tiles (1, n, max_tiles, 3, tile, tile), absent tiles zero,
    and (1, n, 2) tile grids."""
    tiles = torch.zeros(1, len(images), max_num_tiles, 3, tile, tile)
    grids = []
    for i, im in enumerate(images):
        t, grid = mllama_tiles(load_image(im), tile, max_num_tiles)
        tiles[0, i, : t.shape[0]] = t
        grids.append(grid)
    return tiles, torch.tensor([grids], dtype=torch.long).view(1, len(images), 2)


def llama4_tiles(image, tile: int = 336, max_num_tiles: int = 16) -> tuple[torch.Tensor, tuple[int, int]]:
    """Llama 4's image input: the tiles of the best canvas (as `mllama_tiles`, normalised with 0.5) and, when
    there are several, the whole image resized to one tile appended last (llama-models llama4/chat_format.py
    `_encode_content`: `VariableSizeImageTransform`, then `ResizeNormalizeImageTransform` for the global tile)."""
    tiles, grid = mllama_tiles(image, tile, max_num_tiles, LLAMA4_MEAN, LLAMA4_STD)
    if tiles.shape[0] == 1:
        return tiles, grid
    whole = _normalized(image.resize((tile, tile), _pil().Resampling.BILINEAR), LLAMA4_MEAN, LLAMA4_STD)
    return torch.cat([tiles, whole[None]]), grid


def llama4_image_layout(grid: tuple[int, int], n_tiles: int, tokens_per_tile: int) -> list[str]:
    """The special tokens one image occupies in a Llama 4 prompt (llama-models llama4/chat_format.py
    `_encode_image`): <|image_start|>; for several tiles, each tile's <|patch|> run with <|tile_x_separator|>
    between the tiles of a row and <|tile_y_separator|> after each row; then <|image|> and the global (or only)
    tile's patches; <|image_end|>."""
    rows, cols = grid
    out = ["<|image_start|>"]
    if n_tiles > 1:
        for _ in range(rows):
            for x in range(cols):
                out += ["<|patch|>"] * tokens_per_tile
                if x < cols - 1:
                    out.append("<|tile_x_separator|>")
            out.append("<|tile_y_separator|>")
    return out + ["<|image|>"] + ["<|patch|>"] * tokens_per_tile + ["<|image_end|>"]
