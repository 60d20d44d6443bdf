"""Llama 4's vision encoder, pixel shuffle, adapter and projection against Meta's reference (llama-models
`VisionEmbeddings` + `vision_projection`) and transformers' Llama4VisionModel + Llama4MultiModalProjector, float32.

Tiny configurations (56-pixel tiles of 14-pixel patches: 16 patches, 4 tokens after the shuffle); every weight
redrawn; weights pass through our converter (checkpoint/llama4_vision.py) where names differ.
"""

from __future__ import annotations

import pytest
import torch

from llamaherd.checkpoint.llama4_vision import config_from_hf, config_from_params, hf_to_meta
from llamaherd.model.vision_llama4 import Llama4Vision, merge_image_features

from .vision_fixtures import redraw

VISION_ARGS = {"image_size": {"height": 56, "width": 56}, "patch_size": {"height": 14, "width": 14}, "dim": 32,
               "n_layers": 2, "n_heads": 4, "mlp_ratio": 4.0, "output_dim": 48, "pixel_shuffle_ratio": 0.5}
DIM = 64  # the text width the projection maps to
PATCH = 200  # a <|patch|> token id for the merge


def _tiles(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 56, 56, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def meta_pair(meta_parallel):
    from fairscale.nn.model_parallel.layers import ColumnParallelLinear
    from llama_models.llama4.args import VisionArgs
    from llama_models.llama4.vision.embedding import VisionEmbeddings

    with pytest.MonkeyPatch.context() as mp:
        # The reference allocates its attention KV caches with .cuda(); this CPU machine keeps them in place.
        mp.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
        torch.manual_seed(0)
        emb = VisionEmbeddings(VisionArgs(**VISION_ARGS)).float()  # it casts its encoder to bf16
        proj = ColumnParallelLinear(VISION_ARGS["output_dim"], DIM, bias=False, init_method=lambda x: x)
    ref = torch.nn.ModuleDict({"vision_embeddings": emb, "vision_projection": proj})
    redraw(ref, seed=1, std=0.2)
    ours = Llama4Vision(config_from_params(VISION_ARGS), DIM)
    ours.load_state_dict(ref.state_dict(), strict=True)  # Meta's names are ours
    return ref, ours.eval()


def test_features_match_meta(meta_pair):
    ref, ours = meta_pair
    tiles = _tiles(3, 2)
    T = 3 * 4 + 5  # 3 tiles x 4 patch tokens, among text tokens
    tokens = torch.full((1, T), 7)
    tokens[0, 2:14] = PATCH
    mask = (tokens == PATCH)[..., None]
    with torch.no_grad():
        h_image = ref["vision_embeddings"]([[tiles]], mask, torch.zeros(1, T, DIM))  # scattered to the patches
        h_text = torch.randn(1, T, DIM, generator=torch.Generator().manual_seed(3))
        expected = h_text * ~mask + ref["vision_projection"](h_image) * mask  # llama-models Transformer.forward
        feats = ours(tiles)  # (3, 4, DIM)
        got = merge_image_features(h_text, tokens, PATCH, feats.reshape(-1, DIM))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (feats - ours(_tiles(3, 9))).abs().max() > 1e-2  # the pixels matter


def test_features_match_transformers():
    from transformers import Llama4VisionConfig
    from transformers.models.llama4.modeling_llama4 import Llama4MultiModalProjector, Llama4VisionModel

    hf = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
          "image_size": 56, "patch_size": 14, "pixel_shuffle_ratio": 0.5, "projector_input_dim": 48,
          "projector_output_dim": 48, "vision_output_dim": 48, "rope_parameters": {"rope_theta": 10000.0}}
    vcfg = Llama4VisionConfig(**hf)
    torch.manual_seed(0)
    model = Llama4VisionModel(vcfg)

    class Cfg:  # the projector reads only these two widths
        vision_config = vcfg
        text_config = type("T", (), {"hidden_size": DIM})

    ref = torch.nn.ModuleDict({"vision_model": model, "multi_modal_projector": Llama4MultiModalProjector(Cfg)})
    redraw(ref, seed=4, std=0.2)
    ours = Llama4Vision(config_from_hf(hf), DIM)
    ours.load_state_dict(hf_to_meta(ref.state_dict()), strict=True)
    tiles = _tiles(2, 5)
    with torch.no_grad():
        expected = ref["multi_modal_projector"](ref["vision_model"](tiles).last_hidden_state)
        torch.testing.assert_close(ours.eval()(tiles), expected, atol=1e-5, rtol=0)


def test_merge_counts_must_agree():
    h = torch.zeros(1, 4, 8)
    with pytest.raises(ValueError, match="2 <\\|patch\\|> tokens but 3"):
        merge_image_features(h, torch.tensor([[1, PATCH, PATCH, 2]]), PATCH, torch.ones(3, 8))


def test_release_vision_tower_count_equals_transformers():
    """Scout's and Maverick's vision tower, built on the meta device at the released vision_args, has as many
    parameters as transformers' Llama4VisionModel + projector at the released vision_config (the figure the
    Llama 4 presets add to their text decoders as unbuilt_params)."""
    from transformers import Llama4VisionConfig
    from transformers.models.llama4.modeling_llama4 import Llama4MultiModalProjector, Llama4VisionModel

    from llamaherd.config import Llama4VisionConfig as Ours
    from llamaherd.presets.llama4 import VISION_PARAMS

    with torch.device("meta"):
        ours = sum(p.numel() for p in Llama4Vision(Ours(), 5120).parameters())
        vcfg = Llama4VisionConfig(hidden_size=1408, num_hidden_layers=34, num_attention_heads=16,
                                  intermediate_size=5632, image_size=336, patch_size=14, vision_output_dim=4096,
                                  projector_input_dim=4096, projector_output_dim=4096)

        class Cfg:
            vision_config = vcfg
            text_config = type("T", (), {"hidden_size": 5120})

        hf = sum(p.numel() for m in (Llama4VisionModel(vcfg), Llama4MultiModalProjector(Cfg)) for p in m.parameters())
    assert ours == hf == VISION_PARAMS


# -- the whole Llama 4 model with images: early fusion into the text decoder --------------------------------

def _tiny_llama4():
    """test_llama4's tiny text decoder with the tiny vision tower above; <|patch|> is id PATCH."""
    from llamaherd.checkpoint.llama4 import config_from_params as llama4_config_from_params

    from .test_llama4 import PARAMS

    params = {**PARAMS, "vision_args": VISION_ARGS}
    return params, llama4_config_from_params(params)


def _prompt(n_tiles: int) -> torch.Tensor:
    """Text, then n_tiles x 4 <|patch|> tokens, then text."""
    ids = [1, 5, 6] + [PATCH] * (4 * n_tiles) + [7, 8, 9, 10]
    return torch.tensor([ids])


def test_llama4_logits_with_images_match_meta(meta_parallel, monkeypatch):
    from llama_models.llama4.args import ModelArgs, MoEArgs, VisionArgs
    from llama_models.llama4.datatypes import MaskedEmbedding, TransformerInput
    from llama_models.llama4.model import Transformer as MetaTransformer

    from llamaherd.model.vision_llama4 import ImageFeatures

    from .conftest import random_model

    params, config = _tiny_llama4()
    ours = random_model(config, seed=0)
    redraw(ours.vision_embeddings, seed=5, std=0.2)
    redraw(ours.vision_projection, seed=6, std=0.2)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    args = ModelArgs(**{**params, "moe_args": MoEArgs(**params["moe_args"]),
                        "vision_args": VisionArgs(**VISION_ARGS), "max_batch_size": 1})
    ref = MetaTransformer(args).float()  # Meta builds its encoder in bf16: float32 before loading, to compare
    ref.load_state_dict(ours.state_dict(), strict=True)
    ref.eval()
    tiles = _tiles(3, 11)
    toks = _prompt(3)
    mask = (toks == PATCH)[..., None]
    with torch.no_grad():
        h_image = ref.vision_embeddings([[tiles]], mask, torch.zeros(1, toks.shape[1], DIM))
        expected = ref(TransformerInput(tokens=toks, tokens_position=0,
                                        image_embedding=MaskedEmbedding(embedding=h_image, mask=mask))).logits
        feats = ours.vision_projection(ours.vision_embeddings(tiles)).reshape(-1, DIM)
        got = ours(toks, images=ImageFeatures(feats, PATCH))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    with torch.no_grad():
        other = ours.vision_projection(ours.vision_embeddings(_tiles(3, 12))).reshape(-1, DIM)
        assert (ours(toks, images=ImageFeatures(other, PATCH)) - got)[0, 3:].abs().max() > 1e-2


def _hf_logits(ref, toks, tiles):
    """The logits of transformers' whole forward. The installed version fails while packing its output (it reads
    `image_outputs` from its text model's output, which has none), after the logits are computed: they are
    taken from the text model's output on the way."""
    seen = []
    handle = ref.language_model.register_forward_hook(lambda m, a, out: seen.append(out.logits))
    try:
        ref(input_ids=toks, pixel_values=tiles)
    except AttributeError as exc:
        assert "image_outputs" in str(exc)
    finally:
        handle.remove()
    return seen[0]


def test_llama4_logits_with_images_match_transformers():
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    from llamaherd.checkpoint.llama4 import config_from_hf, config_to_hf, hf_to_meta
    from llamaherd.model import build
    from llamaherd.model.vision_llama4 import ImageFeatures

    _, text_config = _tiny_llama4()
    vision = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
              "image_size": 56, "patch_size": 14, "pixel_shuffle_ratio": 0.5, "projector_input_dim": 48,
              "projector_output_dim": 48, "vision_output_dim": 48, "rope_parameters": {"rope_theta": 10000.0}}
    cfg = Llama4Config(text_config=config_to_hf(text_config.replace(vision=None)), vision_config=vision,
                       image_token_index=PATCH)
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = redraw(Llama4ForConditionalGeneration(cfg), seed=7, std=0.2).eval()
    config = config_from_hf({**cfg.to_dict(), "model_type": "llama4"})
    assert config.vision is not None
    ours = build(config)
    ours.load_state_dict(hf_to_meta(ref.state_dict(), config), strict=True)
    tiles = _tiles(2, 13)
    toks = _prompt(2)
    with torch.no_grad():
        expected = _hf_logits(ref, toks, tiles)
        feats = ours.vision_projection(ours.vision_embeddings(tiles)).reshape(-1, DIM)
        got = ours(toks, images=ImageFeatures(feats, PATCH))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_llama4_folder_chat_with_an_image(tmp_path):
    """A tiny Llama4ForConditionalGeneration folder (the Llama 4 vocabulary, so the official tokenizer fits) read by
    llamaherd.load: Model.logits on the chat prompt with its image equals transformers' forward on the same tiles;
    Model.chat answers."""
    import base64
    import io
    import shutil
    from pathlib import Path

    import llama_models
    from PIL import Image
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    import llamaherd
    from llamaherd.checkpoint.llama4 import config_to_hf
    from llamaherd.image import llama4_tiles, load_image
    from llamaherd.tokenizer import Tokenizer

    _, text_config = _tiny_llama4()
    vocab = 202048
    patch = Tokenizer.llama4().special_id("<|patch|>")
    vision = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
              "image_size": 56, "patch_size": 14, "pixel_shuffle_ratio": 0.5, "projector_input_dim": 48,
              "projector_output_dim": 48, "vision_output_dim": 48, "rope_parameters": {"rope_theta": 10000.0}}
    cfg = Llama4Config(text_config=config_to_hf(text_config.replace(vision=None, vocab_size=vocab)),
                       vision_config=vision, image_token_index=patch)
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = redraw(Llama4ForConditionalGeneration(cfg), seed=8, std=0.2).eval()
    ref.save_pretrained(tmp_path)
    shutil.copyfile(Path(llama_models.__file__).parent / "llama4" / "tokenizer.model", tmp_path / "tokenizer.model")

    g = torch.Generator().manual_seed(4)
    buf = io.BytesIO()
    Image.fromarray(torch.randint(0, 256, (60, 130, 3), generator=g, dtype=torch.uint8).numpy()).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "What is this?"}]}]
    model = llamaherd.load(tmp_path)
    assert model.config.vision is not None and model.chat_format_name == "llama4"
    ids = model.chat_format(images=True).encode_dialog(messages)
    tiles, grid = llama4_tiles(load_image(url, background=(255, 255, 255)), 56)
    assert grid == (2, 3) and ids.count(patch) == 7 * 4  # six tiles and the global one, 4 patches each
    got = model.logits(ids, images=[url])
    with torch.no_grad():
        expected = _hf_logits(ref, torch.tensor([ids]), tiles)[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    reply = model.chat(messages, max_tokens=3, temperature=0)
    assert reply["role"] == "assistant"


def test_llama4_bind_refuses_a_patch_count_mismatch():
    from llamaherd.errors import ImageError
    from llamaherd.model import build
    from llamaherd.tokenizer import Tokenizer
    from llamaherd.vision_inputs import bind_images

    from .test_vision_llama4_inputs import _png

    _, config = _tiny_llama4()
    net = build(config)
    tok = Tokenizer.llama4()
    patch = tok.special_id("<|patch|>")
    image = _png(50, 40, "RGB", seed=1)  # one 56-pixel tile: 4 patch tokens
    bind_images(net, tok, [1] + [patch] * 4, [image])  # agrees
    with pytest.raises(ImageError, match="3 <\\|patch\\|> tokens but the images make 4"):
        bind_images(net, tok, [1] + [patch] * 3, [image])
    with pytest.raises(ImageError, match="need its tokenizer"):
        bind_images(net, None, [1], [image])
