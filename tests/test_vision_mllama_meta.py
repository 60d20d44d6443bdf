"""Llama 3.2 Vision against Meta's reference (llama-models `CrossAttentionTransformer`) at its real encoder sizes.

Meta's encoder dimensions are constants (ViT-H/14, ~0.8 B parameters, ~3 GB in float32); the tiles are 28 pixels
and the text decoder tiny, so the compute stays small. Weights pass through our converter (`normalize_meta`), images
through Meta's own transform, masks through Meta's own helpers.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from llamaherd.checkpoint.mllama import config_from_meta_params, normalize_meta
from llamaherd.model import build

from .vision_fixtures import VOCAB, meta_params, meta_reference

pytestmark = pytest.mark.slow
IMG = VOCAB  # Meta's model input writes the image token as vocab_size (llama3/chat_format.py: 128256)
ATOL = 1e-4


def _image(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


CASES = {
    # name: (tokens, images); images as (width, height, seed), in token order
    "one image after text": ([1, 5, 6, IMG, 7, 8, 9, 10], [(40, 30, 1)]),
    "multi-tile image": ([1, IMG, 11, 12, 13], [(56, 56, 2)]),
    "two images": ([1, IMG, 20, 21, IMG, 22, 23], [(20, 60, 3), (90, 25, 4)]),
}


@pytest.fixture(scope="module")
def pair(meta_parallel):
    ref = meta_reference()
    config = config_from_meta_params(meta_params())
    ours = build(config, device="meta")
    ours.load_state_dict(normalize_meta(ref.state_dict(), config), strict=True, assign=True)
    return ref, ours.eval()


def _meta(ref, tokens, images, positions=None):
    from llama_models.llama3.chat_format import create_vision_mask

    total = len(tokens)
    masks = [create_vision_mask(tokens, IMG)] if images else [[]]
    caches, xmask, rows = ref.compute_vision_tokens_masks(
        batch_images=[images], batch_masks=masks, total_len=total, device=torch.device("cpu")
    )
    ids = torch.tensor([tokens])
    with torch.no_grad():
        if positions is None:
            return ref.forward(torch.arange(total), ids, xmask, rows, caches, text_only_inference=not images)[0]
        out = []
        for pos in positions:  # Meta's generation loop: prefill, then one position at a time
            out.append(ref.forward(pos, ids, xmask, rows, caches, text_only_inference=not images)[0])
        return torch.cat(out)


def _tiles(ref, images):
    """Meta's own transform, stacked as our model takes them: (1, n, 4, 3, S, S), (1, n, 2)."""
    tiles = torch.zeros(1, len(images), 4, 3, 28, 28)
    ratios = []
    for i, im in enumerate(images):
        t, ar = ref.image_transform(im)
        tiles[0, i, : t.shape[0]] = t
        ratios.append(ar)
    return tiles, torch.tensor([ratios])


@pytest.mark.parametrize("case", sorted(CASES))
def test_full_forward_matches_meta(pair, case):
    ref, ours = pair
    tokens, specs = CASES[case]
    images = [_image(*s) for s in specs]
    expected = _meta(ref, tokens, images)
    ids = torch.tensor([tokens])
    ctx = ours.image_context(ids, *_tiles(ref, images))
    with torch.no_grad():
        got = ours(ids, images=ctx)[0]
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # The image matters: another picture moves the logits of the tokens that see it.
    other = ours.image_context(ids, *_tiles(ref, [_image(*s[:2], s[2] + 100) for s in specs]))
    with torch.no_grad():
        assert (ours(ids, images=other)[0] - got).abs().max() > 1e-2


def test_text_only_matches_meta(pair):
    ref, ours = pair
    tokens = [1, 40, 41, 42, 43]
    with torch.no_grad():
        got = ours(torch.tensor([tokens]))[0]
    torch.testing.assert_close(got, _meta(ref, tokens, []), atol=ATOL, rtol=0)


def test_prefill_then_cached_decode_matches_meta(pair):
    """Meta's generation loop (prefill positions, then one at a time) against ours through the KV cache, with
    the image keys/values computed once. One image: Meta's helper ends a multi-image prompt's last span at the
    prompt, so only single-image continuations are comparable (model/mllama.py `image_spans`)."""
    ref, ours = pair
    tokens = [1, 5, IMG, 7, 8, 9, 10, 11, 12]
    images = [_image(40, 30, 1)]
    prompt = 5
    positions = [torch.arange(prompt)] + [torch.tensor([t]) for t in range(prompt, len(tokens))]
    expected = _meta(ref, tokens, images, positions)
    ids = torch.tensor([tokens])
    ctx = ours.image_context(ids[:, :prompt], *_tiles(ref, images))
    cache = ours.new_cache(1, len(tokens))
    with torch.no_grad():
        got = [ours(ids[:, :prompt], cache=cache, images=ctx)[0]]
        got += [ours(ids[:, t : t + 1], cache=cache, images=ctx)[0] for t in range(prompt, len(tokens))]
    torch.testing.assert_close(torch.cat(got), expected, atol=ATOL, rtol=0)


def test_meta_folder_loads_through_llamaherd(pair, tmp_path):
    """A Meta folder (params.json + consolidated.00.pth of the reference's weights) read by llamaherd.load gives
    Meta's logits; the checkpoint is deleted afterwards (about 3 GB)."""
    import json

    import llamaherd

    ref, _ = pair
    folder = tmp_path / "Llama-3.2-Vision-tiny"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps(meta_params()))
    try:
        torch.save(ref.state_dict(), folder / "consolidated.00.pth")
        model = llamaherd.load(folder)
        tokens, specs = CASES["one image after text"]
        images = [_image(*s) for s in specs]
        got = model.logits(tokens, images=images)
        torch.testing.assert_close(got, _meta(ref, tokens, images), atol=ATOL, rtol=0)
    finally:
        (folder / "consolidated.00.pth").unlink(missing_ok=True)
