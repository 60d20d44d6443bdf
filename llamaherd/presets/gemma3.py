"""Gemma 3 text decoders (270M, 1B, and the language models of 4B, 12B, 27B): one row per release.

Numbers are those of each release's config.json on Hugging Face (`google/gemma-3-<size>[-it]`; for the
multimodal 4B/12B/27B, its `text_config`). Shared by all: head_dim 256 (27B: 128), rms_norm_eps 1e-6,
rope_theta 1e6 on global layers and rope_local_base_freq 1e4 on local ones, every 6th layer global
(sliding_window_pattern 6), GeGLU (gelu_pytorch_tanh), tied embeddings, no softcapping.
Instruction-tuned rows chat through the checkpoint's own Jinja chat template (format "hf").
"""

from __future__ import annotations

from ..config import ModelConfig, RopeScaling
from .preset import Preset

_COMMON = dict(
    arch="gemma3", head_dim=256, norm_eps=1e-6, rope_theta=1_000_000.0, rope_local_theta=10_000.0,
    sliding_window_pattern=6, query_pre_attn_scalar=256.0, tie_embeddings=True,
)
# 4B and larger: 128K context through linear scaling (factor 8) of the global layers' rope
# (config.json text_config "rope_scaling": {"rope_type": "linear", "factor": 8.0}).
_LONG = dict(vocab_size=262208, sliding_window=1024, max_seq_len=131072, rope_scaling=RopeScaling(kind="linear", factor=8.0))
_SMALL = dict(vocab_size=262144, sliding_window=512, max_seq_len=32768)

_SIZES = {
    # name: (config fields, published size). 270M: the model page lists 268M parameters (safetensors);
    # the model card's "270M" is the rounded headline (170M embedding + 100M transformer).
    "gemma-3-270m": (dict(dim=640, hidden_dim=2048, n_layers=18, n_heads=4, n_kv_heads=1, **_SMALL), "268M"),
    "gemma-3-1b": (dict(dim=1152, hidden_dim=6912, n_layers=26, n_heads=4, n_kv_heads=1, **_SMALL), "1B"),
    "gemma-3-4b": (dict(dim=2560, hidden_dim=10240, n_layers=34, n_heads=8, n_kv_heads=4, **_LONG), "4B"),
    "gemma-3-12b": (dict(dim=3840, hidden_dim=15360, n_layers=48, n_heads=16, n_kv_heads=8, **_LONG), "12B"),
    # 27B: head_dim 128 and query_pre_attn_scalar = dim / n_heads = 168 (config.json).
    "gemma-3-27b": (
        dict(dim=5376, hidden_dim=21504, n_layers=62, n_heads=32, n_kv_heads=16, **_LONG,
             head_dim=128, query_pre_attn_scalar=168.0),
        "27B",
    ),
}

_NOTES = "4B/12B/27B rows describe the language model only; the vision tower is not part of this package"


def _rows() -> list[Preset]:
    rows = []
    for name, (fields, published) in _SIZES.items():
        config = ModelConfig(**{**_COMMON, **fields})
        # The pretrained 270M is published without the "-pt" suffix the other sizes carry.
        base = "" if name == "gemma-3-270m" else "-pt"
        for suffix, fmt in ((base, None), ("-it", "hf")):
            repo = name + suffix
            source = f"google/{repo} config.json" + (" text_config" if fields.get("rope_scaling") else "")
            notes = _NOTES if fields.get("rope_scaling") else ""
            rows.append(Preset(name=repo, config=config, source=source, published_params=published,
                               chat_format=fmt, notes=notes))
    return rows


PRESETS: list[Preset] = _rows()
