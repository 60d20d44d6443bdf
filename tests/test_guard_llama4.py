"""Llama Guard 4's architecture through the Llama 4 path: a dense Llama 4 text decoder, written as transformers'
Llama 4 converter writes it for a checkpoint without MoE ("Dense model (possibly Llama Guard) - disable all moe
layers": num_local_experts 0, interleave_moe_layer_step 0, moe_layers []; convert_llama4_weights_to_hf.py),
tiny and random, read by our loader and compared with transformers' Llama4ForCausalLM."""

from __future__ import annotations

import json

import torch


def _dense_llama4(folder):
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    cfg = Llama4TextConfig(vocab_size=256, hidden_size=64, intermediate_size=8192, intermediate_size_mlp=96,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           num_local_experts=0, interleave_moe_layer_step=0, moe_layers=[], attention_chunk_size=16,
                           no_rope_layer_interval=4, use_qk_norm=True, floor_scale=4, attn_scale=0.1,
                           attn_temperature_tuning=True, max_position_embeddings=128, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = Llama4ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    assert not any("experts" in name or "router" in name for name in ref.state_dict())
    ref.save_pretrained(folder)
    return ref


def test_dense_llama4_logits_match_transformers(tmp_path):
    import llamaherd

    ref = _dense_llama4(tmp_path)
    model = llamaherd.load(tmp_path, dtype=torch.float32)
    assert model.config.arch == "llama4" and model.config.moe is None
    toks = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))  # past two chunks of 16
    with torch.no_grad():
        expected = ref(input_ids=toks).logits
    torch.testing.assert_close(model.logits(toks), expected, atol=1e-4, rtol=1e-4)


def test_dense_llama4_config_round_trips_through_transformers(tmp_path):
    """Our config.json for a dense Llama 4 builds transformers' model with no experts and reads back the same."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    from llamaherd.checkpoint.llama4 import config_from_hf, config_to_hf

    _dense_llama4(tmp_path)
    ours = config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    assert ours.moe is None
    hf = config_to_hf(ours)
    rebuilt = Llama4ForCausalLM(Llama4TextConfig(**hf))
    assert not any("experts" in name or "router" in name for name in rebuilt.state_dict())
    assert config_from_hf(hf) == ours
