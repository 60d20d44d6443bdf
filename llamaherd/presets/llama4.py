"""Llama 4 Scout 17B-16E and Maverick 17B-128E (base and Instruct): the text decoders as rows of data.

Numbers are those of Meta's params.json (meta-llama/Llama-4-*/original/params.json) and agree with the
Hugging Face config.json "text_config" of the same repositories:
  dim 5120 (hidden_size), 48 layers, 40 heads, 8 kv heads, head_dim 128, vocab 202048, norm_eps 1e-5,
  rope_theta 5e5, multiple_of 2048, ffn_dim_multiplier 1.2, ffn_exp 4 -> dense SwiGLU width 16384
  (intermediate_size_mlp) and expert width 8192 (intermediate_size, llama-models llama4/moe.py auto_scale_F
  with capacity_factor 1), attention_chunk_size 8192, nope_layer_interval 4 (no_rope_layers: every 4th is
  0), attn_temperature_tuning on, floor_scale 8192, attn_scale 0.1, top_k 1.
  Scout: 16 experts in every layer (interleave 1), use_qk_norm true, use_scaled_rope true (factor 16,
  high_freq_factor 1: llama-models llama4/args.py), max_position_embeddings 10485760.
  Maverick: 128 experts in every second layer (interleave 2), use_qk_norm false, no rope scaling,
  max_position_embeddings 1048576.
Published sizes: the model cards say "17B activated, 109B total" (Scout) and "17B, 400B" (Maverick); the
Hugging Face pages of the same repositories list the safetensors sizes 109B and 402B. Both totals count the
whole multimodal release. The rows build the text decoder (107.77B / 400.71B) and state the vision tower
and projector the published totals include as `unbuilt_params` (VISION_PARAMS, counted with transformers'
Llama4ForConditionalGeneration in tests/test_llama4_presets.py); text + vision = 108.64B / 401.58B, which
is 109B / 402B to the digit (the card's "400B" rounds 401.58B to two figures).
"""

from __future__ import annotations

from ..config import ModelConfig, MoEConfig, RopeScaling
from .preset import Preset

_COMMON = dict(
    arch="llama4", dim=5120, n_layers=48, n_heads=40, n_kv_heads=8, vocab_size=202048, multiple_of=2048,
    ffn_dim_multiplier=1.2, norm_eps=1e-5, rope_theta=500000.0, attention_chunk_size=8192,
    nope_layer_interval=4, attn_temperature_tuning=True, floor_scale=8192.0, attn_scale=0.1,
)

SCOUT = ModelConfig(
    **_COMMON, moe=MoEConfig(num_experts=16, top_k=1, hidden_dim=8192, interleave_step=1), use_qk_norm=True,
    rope_scaling=RopeScaling(kind="llama3", factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
                             original_max_position=8192),
    max_seq_len=10485760,
)
MAVERICK = ModelConfig(
    **_COMMON, moe=MoEConfig(num_experts=128, top_k=1, hidden_dim=8192, interleave_step=2), use_qk_norm=False,
    max_seq_len=1048576,
)

# Vision encoder + projector of both releases (config.json "vision_config": hidden_size 1408, 34 layers,
# intermediate_size 5632, vision_output_dim 4096, projector 4096, image 336, patch 14).
VISION_PARAMS = 871_932_416

_SRC = "meta-llama/{repo} original/params.json and config.json (text_config); size: Hugging Face model page"
_NOTE = "multimodal release; this row is its text decoder (the published size includes the vision tower)"
PRESETS: list[Preset] = [
    Preset(name, config, _SRC.format(repo=repo), published, "17B", chat_format=fmt, notes=_NOTE,
           unbuilt_params=VISION_PARAMS)
    for name, repo, config, published, fmt in [
        ("llama-4-scout-17b-16e", "Llama-4-Scout-17B-16E", SCOUT, "109B", None),
        ("llama-4-scout-17b-16e-instruct", "Llama-4-Scout-17B-16E-Instruct", SCOUT, "109B", "llama4"),
        ("llama-4-maverick-17b-128e", "Llama-4-Maverick-17B-128E", MAVERICK, "402B", None),
        ("llama-4-maverick-17b-128e-instruct", "Llama-4-Maverick-17B-128E-Instruct", MAVERICK, "402B", "llama4"),
    ]
]
