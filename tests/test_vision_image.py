"""Image reading and Llama 3.2 Vision tiling against Meta's transform and transformers' MllamaImageProcessor.

Generated images cover every tile grid, tiny and huge sizes, grayscale, palette, RGBA and EXIF-rotated input;
bad input (corrupt, truncated, bombs, remote URLs) must raise ImageError.
"""

from __future__ import annotations

import base64
import io

import pytest
import torch
from PIL import Image

from llamaherd.errors import ImageError
from llamaherd.image import MEAN, STD, load_image, mllama_batch, mllama_tiles

from .vision_fixtures import import_torchvision


def _noise(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    bands = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = torch.randint(0, 256, (h, w, bands), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(arr[..., 0] if bands == 1 else arr, mode)


# (width, height, mode, tile): every grid of up to 4 tiles, tiny (1x1), huge (4000x3000 at the real 560 tile),
# exact canvases, upscaling and downscaling, grayscale and alpha.
IMAGES = [
    (1, 1, "RGB", 28), (5, 3, "RGB", 28), (28, 28, "RGB", 28), (40, 30, "RGB", 28), (20, 60, "RGB", 28),
    (90, 25, "RGB", 28), (200, 50, "RGB", 28), (56, 56, "RGB", 28), (30, 100, "L", 28), (64, 48, "RGBA", 28),
    (57, 29, "RGB", 28), (4000, 3000, "RGB", 560), (560, 1120, "RGB", 560), (300, 2000, "L", 560),
    (1300, 700, "RGBA", 560), (559, 561, "RGB", 560),
]


def _meta_transform(tile: int):
    import_torchvision()
    from llama_models.llama3.multimodal.image_transform import VariableSizeImageTransform

    return VariableSizeImageTransform(size=tile)


@pytest.mark.parametrize("w,h,mode,tile", IMAGES)
def test_tiles_equal_meta_transform(w, h, mode, tile):
    image = _noise(w, h, mode, seed=w * 7 + h)
    # Meta's chat format converts to RGB before its transform (llama3/chat_format.py); alpha is dropped.
    expected, grid = _meta_transform(tile)(image.convert("RGB"), max_num_chunks=4)
    got, ours = mllama_tiles(load_image(image), tile, 4)
    assert ours == tuple(grid)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize("w,h,mode,tile", [im for im in IMAGES if im[2] != "RGBA"])
def test_tiles_match_transformers_processor(w, h, mode, tile):
    """transformers' PIL-backend processor on the same RGB image: same grid, pixels within float32 rounding
    (it rescales and normalises in another order). RGBA is left out: transformers composites transparency on
    white where Meta drops the alpha channel."""
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    image = load_image(_noise(w, h, mode, seed=w * 7 + h))
    # Settings of the released preprocessor_config.json (CLIP mean/std, bilinear), the tile size of the test.
    proc = MllamaImageProcessorPil(size={"height": tile, "width": tile}, max_image_tiles=4, image_mean=list(MEAN),
                                   image_std=list(STD), resample=Image.Resampling.BILINEAR)
    out = proc(images=[[image]], return_tensors="pt")
    tiles, grids = mllama_batch([image], tile, 4)
    n = int(out["num_tiles"][0][0])
    assert n == int(grids[0, 0, 0] * grids[0, 0, 1])
    torch.testing.assert_close(tiles[0, 0, :n], out["pixel_values"][0, 0, :n].float(), atol=1e-5, rtol=0)


def test_exif_orientation_is_applied(tmp_path):
    image = _noise(40, 20, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "phone.jpg"
    image.save(path, exif=exif.tobytes())
    loaded = load_image(path)
    assert loaded.size == (20, 40)
    # The same pixels as Meta's transform applied to the upright image.
    upright = Image.open(path).transpose(Image.Transpose.ROTATE_270).convert("RGB")
    expected, _ = _meta_transform(28)(upright, max_num_chunks=4)
    torch.testing.assert_close(mllama_tiles(loaded, 28, 4)[0], expected, atol=0, rtol=0)


def test_sources_path_bytes_data_url(tmp_path):
    image = _noise(30, 30, seed=5)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    data = buf.getvalue()
    (tmp_path / "a.png").write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    for source in (tmp_path / "a.png", str(tmp_path / "a.png"), data, url, image):
        assert load_image(source).tobytes() == image.tobytes()


@pytest.mark.parametrize(
    "source,message",
    [
        (b"not an image at all", "not a readable image"),
        ("https://example.com/cat.png", "remote image URLs are refused"),
        ("http://127.0.0.1/cat.png", "remote image URLs are refused"),
        ("data:image/png;base64,@@@", "malformed"),
        ("/no/such/file.png", "no such image file"),
        (12345, "must be a path"),
    ],
)
def test_bad_sources_raise_image_error(source, message):
    with pytest.raises(ImageError, match=message):
        load_image(source)


def test_truncated_image_raises_image_error():
    buf = io.BytesIO()
    _noise(64, 64, seed=1).save(buf, format="PNG")
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(buf.getvalue()[:300])


def test_decompression_bomb_refused_before_decoding():
    # A 9000 x 9000 bilevel PNG is ~1 MB on disk but 81 megapixels: refused from its header.
    buf = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buf, format="PNG")
    with pytest.raises(ImageError, match="exceeds the limit|decompression bomb"):
        load_image(buf.getvalue())
    with pytest.raises(ImageError, match="exceeds the limit"):
        load_image(_noise(100, 100), max_pixels=5000)
