"""Llama 4 presets and checkpoint transforms: sizes against transformers' own models, name tables round-trip."""

from __future__ import annotations

import pytest
import torch

from llamaherd import presets
from llamaherd.checkpoint import llama4 as names
from llamaherd.config import ConfigError
from llamaherd.errors import CheckpointError, LlamaherdError
from llamaherd.presets.llama4 import MAVERICK, SCOUT, VISION_PARAMS

from .conftest import random_model
from .test_llama4 import CONFIG, PARAMS, meta_reference

# The vision_config of the Scout / Maverick config.json.
VISION = dict(hidden_size=1408, intermediate_size=5632, num_hidden_layers=34, num_attention_heads=16, image_size=336,
              patch_size=14, pixel_shuffle_ratio=0.5, projector_input_dim=4096, projector_output_dim=4096,
              vision_output_dim=4096, norm_eps=1e-5)


@pytest.mark.parametrize("config", [SCOUT, MAVERICK], ids=["scout", "maverick"])
def test_sizes_equal_transformers_models(config):
    """Our parameter count is transformers' for the same config; the release adds exactly VISION_PARAMS."""
    from transformers import Llama4Config, Llama4ForCausalLM, Llama4ForConditionalGeneration, Llama4TextConfig

    total, active = presets.count_parameters(config)
    with torch.device("meta"):
        text = Llama4ForCausalLM(Llama4TextConfig(**names.config_to_hf(config)))
        full = Llama4ForConditionalGeneration(Llama4Config(text_config=names.config_to_hf(config), vision_config=VISION))
    assert total == sum(p.numel() for p in text.parameters())
    assert total + VISION_PARAMS == sum(p.numel() for p in full.parameters())
    # Active: embeddings, attention, dense layers, shared experts and top_k of E routed experts per MoE layer.
    routed = sum(p.numel() for n, p in text.named_parameters() if ".experts." in n)
    assert active == total - routed + routed * config.moe.top_k // config.moe.num_experts


def test_published_sizes():
    for name, total, active in [("llama-4-scout-17b-16e-instruct", 109e9, 17e9), ("llama-4-maverick-17b-128e", 402e9, 17e9)]:
        p = presets.get(name)
        t, a = presets.count_parameters(p.config)
        assert abs(t + p.unbuilt_params - total) < 0.5e9 and abs(a - active) < 0.5e9


def test_released_params_json_reads_as_preset():
    """Scout's params.json (as released) through config_from_params gives the preset's architecture."""
    scout = dict(dim=5120, n_layers=48, n_heads=40, n_kv_heads=8, vocab_size=202048, multiple_of=2048,
                 ffn_dim_multiplier=1.2, ffn_exp=4.0, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True,
                 nope_layer_interval=4, use_qk_norm=True, attention_chunk_size=8192, attn_temperature_tuning=True,
                 floor_scale=8192, attn_scale=0.1,
                 moe_args=dict(num_experts=16, capacity_factor=1.0, auto_scale_F=True, top_k=1,
                               interleave_moe_layer_step=1))
    got = names.config_from_params(scout)
    assert got == SCOUT


@pytest.mark.parametrize("nested", [False, True], ids=["text", "multimodal"])
@pytest.mark.parametrize("config", [CONFIG, SCOUT, MAVERICK], ids=["tiny", "scout", "maverick"])
def test_hf_config_round_trip(config, nested):
    """Through transformers' own serialisation of Llama4TextConfig and back."""
    from transformers import Llama4TextConfig

    saved = Llama4TextConfig(**names.config_to_hf(config)).to_dict()
    got = names.config_from_hf({"text_config": saved} if nested else saved)
    assert got == config.replace(multiple_of=got.multiple_of, ffn_dim_multiplier=got.ffn_dim_multiplier)


def test_state_dict_round_trip():
    sd = random_model(CONFIG).state_dict()
    hf = names.meta_to_hf(sd, CONFIG)
    assert "model.layers.1.feed_forward.experts.gate_up_proj" in hf
    assert hf["model.layers.1.feed_forward.router.weight"].shape == (4, CONFIG.dim)
    back = names.hf_to_meta(hf, CONFIG)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    # Multimodal checkpoints nest the text model and carry a vision tower, which the reader skips.
    nested = {"language_model." + k: v for k, v in hf.items()} | {"vision_model.patch_embedding.weight": torch.zeros(1)}
    assert names.hf_to_meta(nested, CONFIG).keys() == sd.keys()


def test_meta_reference_spellings_normalize(meta_parallel, monkeypatch):
    """Meta's reference modules name experts w1/w2/w3 (and checkpoints may flatten them): both map back."""
    ours = random_model(CONFIG).state_dict()
    ref_sd = meta_reference(PARAMS, ours, monkeypatch).state_dict()
    assert "layers.1.feed_forward.experts.w1" in ref_sd
    got = names.normalize_meta(ref_sd, CONFIG)
    assert got.keys() == ours.keys() and all(torch.equal(got[k], ours[k]) for k in ours)
    flat = {k: (v.flatten(0, 1) if ".experts." in k else v) for k, v in ref_sd.items()}  # (E*D, F) / (E*F, D)
    flat_got = names.normalize_meta(flat, CONFIG)
    assert all(torch.equal(flat_got[k], ours[k]) for k in ours)


def test_bad_inputs_raise_typed_errors():
    sd = random_model(CONFIG).state_dict()
    with pytest.raises(CheckpointError, match="not part of a Llama 4"):
        names.meta_to_hf({**sd, "layers.0.attention.bogus": torch.zeros(1)}, CONFIG)
    with pytest.raises(CheckpointError, match="not part of a Llama 4"):
        names.hf_to_meta({"model.layers.0.mlp.gate_proj.weight": torch.zeros(1)}, CONFIG)
    del sd["layers.1.feed_forward.experts.moe_w_swiglu_eD_F"]
    with pytest.raises(CheckpointError, match="must both be present"):
        names.meta_to_hf(sd, CONFIG)
    with pytest.raises(CheckpointError, match="ffn_exp"):
        names.config_from_params({k: v for k, v in PARAMS.items() if k != "ffn_exp"})
    with pytest.raises(LlamaherdError, match="no_rope_layers"):
        names.config_from_hf({**names.config_to_hf(CONFIG), "no_rope_layers": [1, 0, 0, 1]})
    with pytest.raises(ConfigError):
        names.config_to_hf(CONFIG.replace(arch="llama", moe=None))
