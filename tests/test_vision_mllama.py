"""Llama 3.2 Vision against transformers' MllamaForConditionalGeneration: float32 logits within 1e-4.

Weights pass through our converter (checkpoint/mllama.py `hf_to_meta`, `config_from_hf`); references are built
with every parameter redrawn (gates included); masks and aspect-ratio ids come from transformers' own helpers;
the reference reads Meta's intermediate features (vision_fixtures.with_meta_intermediate_layers).
"""

from __future__ import annotations

import pytest
import torch

from llamaherd.checkpoint.mllama import config_from_hf, hf_to_meta
from llamaherd.model import build
from llamaherd.model.mllama import image_spans

from .vision_fixtures import VOCAB, hf_config_dict, hf_inputs, hf_reference, random_tiles

pytest.importorskip("transformers")

IMG = VOCAB  # the image token id (HF image_token_index, Meta's 128256 = vocab_size)
ATOL = 1e-4

# Every case opens with an image: transformers lets a token that sees no image attend uniformly to all image keys
# (it gates only the feed-forward of such rows), while Meta's reference, which this package follows, zeroes that
# attention output too (llama-models `CrossAttention.forward`: output * full_text_row_masked_out_mask). Tokens
# before the first image are compared with Meta's reference in test_vision_mllama_meta.py.
CASES = {
    # name: (tokens, aspect ratios (rows, cols) of the images in token order)
    "one image": ([IMG, 5, 6, 7, 8, 9], [(1, 2)]),
    "multi-tile image": ([IMG, 11, 12, 13, 14], [(2, 2)]),
    "two images": ([IMG, 20, 21, 22, IMG, 23, 24, 25], [(1, 1), (2, 1)]),
    "two adjacent images": ([IMG, IMG, 30, 31, 32], [(1, 3), (1, 1)]),
}


@pytest.fixture(scope="module")
def pair():
    ref = hf_reference()
    config = config_from_hf(hf_config_dict())
    ours = build(config)
    ours.load_state_dict(hf_to_meta(ref.state_dict(), config), strict=True)
    return ref, ours


def _ours_full(ours, tokens, ratios, tiles):
    ids = torch.tensor([tokens])
    ctx = ours.image_context(ids, tiles, torch.tensor([ratios])) if tiles is not None else None
    with torch.no_grad():
        return ours(ids, images=ctx)[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_full_forward_matches_transformers(pair, case):
    ref, ours = pair
    tokens, ratios = CASES[case]
    tiles = random_tiles(ratios)
    with torch.no_grad():
        expected = ref(**hf_inputs(tokens, ratios, tiles)).logits[0]
    torch.testing.assert_close(_ours_full(ours, tokens, ratios, tiles), expected, atol=ATOL, rtol=0)


def test_text_only_matches_transformers(pair):
    ref, ours = pair
    tokens = [1, 40, 41, 42, 43, 44]
    with torch.no_grad():
        expected = ref(**hf_inputs(tokens, [], None)).logits[0]
    torch.testing.assert_close(_ours_full(ours, tokens, [], None), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", ["one image", "two images", "multi-tile image"])
def test_prefill_then_cached_decode_matches_transformers(pair, case):
    """Prefill the prompt, then feed the rest one token at a time through the caches; the image keys and values
    are computed once, before prefill."""
    ref, ours = pair
    tokens, ratios = CASES[case]
    tokens = tokens + [50, 51, 52, 53]  # continuation past the prompt
    tiles = random_tiles(ratios)
    with torch.no_grad():
        expected = ref(**hf_inputs(tokens, ratios, tiles)).logits[0]
    prompt = len(CASES[case][0])
    ids = torch.tensor([tokens])
    ctx = ours.image_context(ids[:, :prompt], tiles, torch.tensor([ratios]))
    cache = ours.new_cache(1, len(tokens))
    with torch.no_grad():
        got = [ours(ids[:, :prompt], cache=cache, images=ctx)[0]]
        for t in range(prompt, len(tokens)):
            got.append(ours(ids[:, t : t + 1], cache=cache, images=ctx)[0])
    torch.testing.assert_close(torch.cat(got), expected, atol=ATOL, rtol=0)


def test_the_image_moves_the_logits(pair):
    _, ours = pair
    tokens, ratios = CASES["one image"]
    a = _ours_full(ours, tokens, ratios, random_tiles(ratios, seed=1))
    b = _ours_full(ours, tokens, ratios, random_tiles(ratios, seed=2))
    assert (a - b).abs().max() > 1e-2


def test_tokens_before_the_image_differ_from_transformers(pair):
    """The one known difference (see CASES): it exists, so the comparison above is not vacuous about it."""
    ref, ours = pair
    tokens, ratios = [1, 5, IMG, 6, 7], [(1, 1)]
    tiles = random_tiles(ratios)
    with torch.no_grad():
        expected = ref(**hf_inputs(tokens, ratios, tiles)).logits[0]
    got = _ours_full(ours, tokens, ratios, tiles)
    assert (got[:2] - expected[:2]).abs().max() > 1e-2
    # Ours ignore the image before its token (Meta's rule): a different image leaves those logits unchanged.
    torch.testing.assert_close(_ours_full(ours, tokens, ratios, random_tiles(ratios, seed=7))[:2], got[:2])


def test_image_spans_match_transformers_processor():
    from transformers.models.mllama.processing_mllama import get_cross_attention_token_mask

    for tokens in ([1, IMG, 5], [IMG, 2, IMG, 3, 4], [1, IMG, IMG, 3, IMG, 5, 6], [IMG, IMG, IMG], [1, 2, 3]):
        expected = get_cross_attention_token_mask(tokens, IMG)
        # transformers ends the last span at the prompt (or -1) and repeats that row while generating; ours stay
        # open: within the prompt they agree.
        got = [[a, min(b, len(tokens))] for a, b in image_spans(tokens, IMG)]
        assert got == [[a, len(tokens) if b == -1 else b] for a, b in expected]
