"""Llama 3.2 Vision presets: parameter counts of the model built on the meta device against transformers' own
MllamaForConditionalGeneration at the released configurations (also built on the meta device)."""

from __future__ import annotations

import pytest
import torch

from llamaherd import presets

pytest.importorskip("transformers")


def _hf_count(text_dim: int, text_layers: int, cross_layers: list[int], hidden: int, heads: int) -> int:
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    cfg = MllamaConfig(
        vision_config={},  # transformers' defaults are the released encoder (560 tiles are set below)
        text_config={"hidden_size": text_dim, "num_hidden_layers": text_layers, "cross_attention_layers": cross_layers,
                     "intermediate_size": hidden, "num_attention_heads": heads, "num_key_value_heads": 8},
    )
    cfg.vision_config.image_size = 560
    with torch.device("meta"):
        model = MllamaForConditionalGeneration(cfg)
    return sum(p.numel() for p in model.parameters())


# transformers keeps one table row per aspect-ratio id plus a padding row 0 that a model never reads: the
# position table's row is 4 tiles x 1601 tokens x 1280, each tile table's 4 x 1280.
HF_PADDING_ROWS = 4 * 1601 * 1280 + 2 * 4 * 1280


@pytest.mark.parametrize(
    "name,dim,layers,cross,hidden,heads",
    [
        ("llama-3.2-11b-vision", 4096, 40, [3, 8, 13, 18, 23, 28, 33, 38], 14336, 32),
        ("llama-3.2-90b-vision-instruct", 8192, 100, list(range(3, 100, 5)), 28672, 64),
        ("llama-guard-3-11b-vision", 4096, 40, [3, 8, 13, 18, 23, 28, 33, 38], 14336, 32),
    ],
)
def test_vision_preset_counts_equal_transformers(name, dim, layers, cross, hidden, heads):
    total, _ = presets.count_parameters(presets.get(name).config)
    assert total + HF_PADDING_ROWS == _hf_count(dim, layers, cross, hidden, heads)


def test_11b_count_equals_the_released_weights():
    # meta-llama/Llama-3.2-11B-Vision model.safetensors.index.json: total_size 21340441670 bytes of bf16.
    total, _ = presets.count_parameters(presets.get("llama-3.2-11b-vision").config)
    assert total + HF_PADDING_ROWS == 21340441670 // 2
