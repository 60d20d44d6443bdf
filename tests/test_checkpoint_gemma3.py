"""Gemma 3 HF folders both ways: transformers' save_pretrained -> llamaherd.load; our writer -> from_pretrained."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import llamaherd
from llamaherd.checkpoint import hf
from llamaherd.checkpoint.gemma3 import config_from_hf, config_to_hf, hf_to_meta
from llamaherd.errors import CheckpointError

transformers = pytest.importorskip("transformers")

SEQ = 20  # longer than the window (8): local layers drop keys within every test


def text_config(**changes):
    """4 layers, every 2nd global; the rope thetas, scaling and caps differ from transformers' defaults so a
    field read wrongly (or left at its default) moves the logits."""
    fields = dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=512, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 2, query_pre_attn_scalar=24,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 50_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}},
        final_logit_softcapping=6.0, tie_word_embeddings=True, pad_token_id=0,
    )
    fields.update(changes)
    return transformers.Gemma3TextConfig(**fields)


def randomize(model, seed=0):
    """Norm weights are offsets from one in HF and here: random around zero so every norm matters."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3 if name.endswith("norm.weight") else 0.15)
    return model.eval()


def tokens(seed=1, batch=2):
    return torch.randint(0, 256, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=["tied", "untied"])
def saved(request, tmp_path_factory):
    """(transformers model, its save_pretrained folder): safetensors + config.json, no tokenizer files."""
    cfg = text_config(tie_word_embeddings=request.param == "tied")
    cfg._attn_implementation = "eager"
    ref = randomize(transformers.Gemma3ForCausalLM(cfg))
    folder = tmp_path_factory.mktemp(f"hf_{request.param}")
    ref.save_pretrained(folder)
    return ref, folder


def test_load_matches_transformers(saved):
    ref, folder = saved
    model = llamaherd.load(folder)
    assert model.tokenizer is None  # the folder carries none; weights still load
    c = model.config
    assert (c.arch, c.sliding_window, c.sliding_window_pattern, c.rope_theta, c.rope_local_theta) == (
        "gemma3", 8, 2, 50_000.0, 500.0)
    assert c.rope_scaling.kind == "linear" and c.rope_scaling.factor == 4.0 and c.final_logit_softcap == 6.0
    ids = tokens()
    with torch.no_grad():
        expected = ref(ids).logits
    got = model.logits(ids)
    assert expected.abs().max() > 1.0  # the random weights move the logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_norm_weights_copied_unchanged(saved):
    """HF's Gemma3RMSNorm and ours both scale by (1 + w): the stored w is read as is, with no offset."""
    ref, folder = saved
    sd = hf.read(folder).state_dict
    theirs = ref.state_dict()
    assert torch.equal(sd["layers.1.post_ffn_norm.weight"], theirs["model.layers.1.post_feedforward_layernorm.weight"])
    assert torch.equal(sd["layers.0.attention.k_norm.weight"], theirs["model.layers.0.self_attn.k_norm.weight"])
    assert torch.equal(sd["norm.weight"], theirs["model.norm.weight"])


def test_written_folder_loads_in_transformers(saved, tmp_path):
    ref, folder = saved
    hf.write(hf.read(folder), tmp_path)
    back = transformers.Gemma3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert back.config.layer_types == ref.config.layer_types
    assert back.config.rope_parameters == ref.config.rope_parameters
    ids = tokens(seed=2)
    with torch.no_grad():
        # Same weights, same config, same code: equal to the last bit.
        torch.testing.assert_close(back(ids).logits, ref(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_read_write_read_bit_identical(saved, dtype, tmp_path):
    ref, folder = saved
    first = hf.read(folder)
    first.state_dict = {k: t.to(dtype) for k, t in first.state_dict.items()}
    hf.write(first, tmp_path / "a")
    again = hf.read(tmp_path / "a")
    assert again.config == first.config
    assert set(again.state_dict) == set(first.state_dict)
    for name, t in first.state_dict.items():
        assert again.state_dict[name].dtype == dtype and torch.equal(again.state_dict[name], t), name
    # The written tensor names are exactly those transformers saves.
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as a, safe_open(tmp_path / "a" / "model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys())


def test_multimodal_checkpoint_loads_its_text_decoder(tmp_path, caplog):
    """Gemma3ForConditionalGeneration: language_model.* tensors read, vision tower skipped (and said so)."""
    # transformers' Gemma3ForConditionalGeneration never applies final_logit_softcapping (only Gemma3ForCausalLM
    # does); the released multimodal configs state none, so the comparison leaves it out.
    text = text_config(final_logit_softcapping=None).to_dict()
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    ref = randomize(transformers.Gemma3ForConditionalGeneration(cfg))
    ref.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gemma3"
    with caplog.at_level(logging.INFO, logger="llamaherd.checkpoint.gemma3"):
        model = llamaherd.load(tmp_path)
    assert "vision tensors" in caplog.text
    ids = tokens(seed=3)
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
    torch.testing.assert_close(model.logits(ids), expected, atol=1e-4, rtol=1e-4)


# ---- config.json spellings -------------------------------------------------------------------------------


def _ours(hf_config) -> object:
    return config_from_hf(hf_config.to_dict())


def test_transformers4_spelling_reads_as_transformers_does():
    """rope_theta / rope_local_base_freq / rope_scaling / sliding_window_pattern (config.json of the releases)."""
    legacy = dict(
        model_type="gemma3_text", vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=7,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=8, sliding_window_pattern=3,
        rope_theta=40_000.0, rope_local_base_freq=700.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
        query_pre_attn_scalar=16,
    )
    ours = config_from_hf(legacy)
    theirs = transformers.Gemma3TextConfig(**{k: v for k, v in legacy.items() if k != "model_type"})
    assert _ours(theirs) == ours
    assert [("full" if (i + 1) % ours.sliding_window_pattern == 0 else "sliding") + "_attention"
            for i in range(7)] == theirs.layer_types
    assert (ours.rope_theta, ours.rope_local_theta, ours.rope_scaling.factor) == (40_000.0, 700.0, 8.0)


def test_sparse_multimodal_text_config_takes_transformers_defaults():
    """google/gemma-3-4b-it's text_config states five fields; the rest are Gemma3TextConfig's defaults."""
    sparse = {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34,
              "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024}
    ours = config_from_hf({"model_type": "gemma3", "text_config": sparse})
    theirs = transformers.Gemma3Config(text_config=dict(sparse)).text_config
    assert _ours(theirs) == ours
    got = (ours.n_heads, ours.n_kv_heads, ours.head_dim, ours.vocab_size, ours.sliding_window_pattern)
    assert got == (8, 4, 256, 262208, 6)


def test_config_to_hf_round_trips_through_transformers():
    for changes in ({}, {"tie_word_embeddings": False, "final_logit_softcapping": None},
                    {"layer_types": ["full_attention"] * 4}, {"layer_types": ["sliding_attention"] * 4}):
        ours = _ours(text_config(**changes))
        theirs = transformers.Gemma3TextConfig(**config_to_hf(ours))
        assert _ours(theirs) == ours, changes
        assert theirs.layer_types == text_config(**changes).layer_types


@pytest.mark.parametrize("change, words", [
    ({"layer_types": ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]}, "periodic"),
    ({"use_bidirectional_attention": True}, "bidirectional"),
    ({"hidden_activation": "silu"}, "gelu_pytorch_tanh"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 2.0}}}, "'yarn'"),
])
def test_unsupported_configs_name_the_field(change, words):
    cfg = {**text_config().to_dict(), **change}
    with pytest.raises(CheckpointError, match=words):
        config_from_hf(cfg, source="some/config.json")


def test_unknown_tensor_is_an_error():
    c = _ours(text_config())
    with pytest.raises(CheckpointError, match="model.layers.0.self_attn.qkv_proj.weight"):
        hf_to_meta({"model.layers.0.self_attn.qkv_proj.weight": torch.zeros(1)}, c)
