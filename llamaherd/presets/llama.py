"""Llama 1, Llama 2, Code Llama, Llama 3 / 3.1 / 3.2 (with Vision) / 3.3 and Llama Guard 3: one row per release.

Each row gives the numbers of the release's params.json (Meta) or config.json (Hugging Face); `source`
names the file. `published` is the size the release states (model card / paper), checked by tests.
"""

from __future__ import annotations

from ..config import ModelConfig, RopeScaling, VisionConfig
from .preset import Preset

# Llama 3.1's frequency scaling as released (params.json "use_scaled_rope": true; the factors are those of
# llama-models llama3/model.py::apply_scaling and of config.json "rope_scaling" of Llama-3.1-8B).
LLAMA31_ROPE = RopeScaling(kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)
# Llama 3.2 1B/3B: the Hugging Face config.json states factor 32 while Meta's reference code hard-codes 8
# (llama-models issues #166, #241). The presets follow the Hugging Face config (the model was trained so);
# a checkpoint that states its own factor always wins over this table.
LLAMA32_ROPE = RopeScaling(kind="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)

_L1 = dict(vocab_size=32000, multiple_of=256, norm_eps=1e-6, rope_theta=10000.0, max_seq_len=2048)
_L2 = dict(vocab_size=32000, multiple_of=256, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096)
_CL = dict(multiple_of=256, norm_eps=1e-5, rope_theta=1_000_000.0, max_seq_len=16384)
_L3 = dict(vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0)

_7B = dict(dim=4096, n_layers=32, n_heads=32)
_13B = dict(dim=5120, n_layers=40, n_heads=40)
_70B = dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3)
_L3_8B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3)
_L3_70B = dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3)
_L31_405B = dict(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.2)
_L32_1B = dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.5)
_L32_3B = dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.0)


def _row(name, source, published, chat_format=None, notes="", **fields) -> Preset:
    return Preset(name=name, config=ModelConfig(**fields), source=source, published_params=published,
                  chat_format=chat_format, notes=notes)


def _variants(base: str, suffixes: dict[str, str | None], source: str, published: str, notes: str = "", **fields):
    """One row per variant (base, -chat, -instruct, -python...) sharing an architecture."""
    return [
        _row(base + suffix, source.format(suffix=suffix), published, chat_format=fmt, notes=notes, **fields)
        for suffix, fmt in suffixes.items()
    ]


_META = "meta-llama/{repo} params.json"
PRESETS: list[Preset] = [
    # Llama 1 (Touvron et al. 2023, table 2; params.json of the original release).
    _row("llama-7b", "LLaMA 7B params.json", "6.7B", **_L1, **_7B),
    _row("llama-13b", "LLaMA 13B params.json", "13.0B", **_L1, **_13B),
    _row("llama-33b", "LLaMA 33B params.json", "32.5B", **_L1, dim=6656, n_layers=60, n_heads=52),
    _row("llama-65b", "LLaMA 65B params.json", "65.2B", **_L1, dim=8192, n_layers=80, n_heads=64),
    # Llama 2 (meta-llama/Llama-2-*-hf config.json; sizes as the Hugging Face model pages state them).
    *_variants("llama-2-7b", {"": None, "-chat": "llama2"}, "meta-llama/Llama-2-7b{suffix}-hf config.json",
               "6.74B", **_L2, **_7B),
    *_variants("llama-2-13b", {"": None, "-chat": "llama2"}, "meta-llama/Llama-2-13b{suffix}-hf config.json",
               "13.0B", **_L2, **_13B),
    *_variants("llama-2-70b", {"": None, "-chat": "llama2"}, "meta-llama/Llama-2-70b{suffix}-hf config.json",
               "69.0B", **{**_L2, **_70B}),
    # Code Llama (codellama/CodeLlama-*-hf config.json): rope theta 1e6, 16K context. Base and Instruct 7B/13B/70B
    # carry 16 infilling tokens (vocab 32016); Python variants and 34B do not.
    *_variants("code-llama-7b", {"": None, "-instruct": "llama2"}, "codellama/CodeLlama-7b{suffix}-hf config.json",
               "6.74B", vocab_size=32016, **_CL, **_7B),
    _row("code-llama-7b-python", "codellama/CodeLlama-7b-Python-hf config.json", "6.74B", vocab_size=32000, **_CL, **_7B),
    *_variants("code-llama-13b", {"": None, "-instruct": "llama2"}, "codellama/CodeLlama-13b{suffix}-hf config.json",
               "13.0B", vocab_size=32016, **_CL, **_13B),
    _row("code-llama-13b-python", "codellama/CodeLlama-13b-Python-hf config.json", "13.0B", vocab_size=32000, **_CL, **_13B),
    *_variants("code-llama-34b", {"": None, "-python": None, "-instruct": "llama2"},
               "codellama/CodeLlama-34b{suffix}-hf config.json", "33.7B", vocab_size=32000, **_CL,
               dim=8192, n_layers=48, n_heads=64, n_kv_heads=8),
    # Code Llama 70B: Meta's params.json states rope_theta 1e6; the Hugging Face config.json says 10000 and a
    # 4096 context. We follow Meta's file (the trained values), as the issue tracker of the HF repo discusses.
    *_variants("code-llama-70b", {"": None, "-instruct": "llama2"}, "codellama/CodeLlama-70b{suffix} params.json",
               "69.0B", vocab_size=32016, **{**_CL, **_70B}),
    _row("code-llama-70b-python", "codellama/CodeLlama-70b-Python params.json", "69.0B", vocab_size=32000,
         **{**_CL, **_70B}),
    # Llama 3 (meta-llama/Meta-Llama-3-*/original/params.json): 8K context.
    *_variants("llama-3-8b", {"": None, "-instruct": "llama3"}, "meta-llama/Meta-Llama-3-8B{suffix} params.json",
               "8.03B", max_seq_len=8192, **_L3, **_L3_8B),
    *_variants("llama-3-70b", {"": None, "-instruct": "llama3"}, "meta-llama/Meta-Llama-3-70B{suffix} params.json",
               "70.6B", max_seq_len=8192, **_L3, **_L3_70B),
    # Llama 3.1: Llama 3 plus frequency scaling and 128K context (params.json "use_scaled_rope": true).
    *_variants("llama-3.1-8b", {"": None, "-instruct": "llama3"}, "meta-llama/Llama-3.1-8B{suffix} params.json",
               "8.03B", max_seq_len=131072, rope_scaling=LLAMA31_ROPE, **_L3, **_L3_8B),
    *_variants("llama-3.1-70b", {"": None, "-instruct": "llama3"}, "meta-llama/Llama-3.1-70B{suffix} params.json",
               "70.6B", max_seq_len=131072, rope_scaling=LLAMA31_ROPE, **_L3, **_L3_70B),
    *_variants("llama-3.1-405b", {"": None, "-instruct": "llama3"}, "meta-llama/Llama-3.1-405B{suffix} params.json",
               "406B", max_seq_len=131072, rope_scaling=LLAMA31_ROPE, **_L3, **_L31_405B),
    # Llama 3.2 text: tied embeddings, 128K context (meta-llama/Llama-3.2-*/config.json).
    *_variants("llama-3.2-1b", {"": None, "-instruct": "llama3.2"}, "meta-llama/Llama-3.2-1B{suffix} config.json",
               "1.24B", max_seq_len=131072, rope_scaling=LLAMA32_ROPE, tie_embeddings=True, **_L3, **_L32_1B),
    *_variants("llama-3.2-3b", {"": None, "-instruct": "llama3.2"}, "meta-llama/Llama-3.2-3B{suffix} config.json",
               "3.21B", max_seq_len=131072, rope_scaling=LLAMA32_ROPE, tie_embeddings=True, **_L3, **_L32_3B),
    # Llama 3.3: the Llama 3.1 70B architecture.
    _row("llama-3.3-70b-instruct", "meta-llama/Llama-3.3-70B-Instruct params.json", "70.6B", chat_format="llama3",
         max_seq_len=131072, rope_scaling=LLAMA31_ROPE, **_L3, **_L3_70B),
    # Llama Guard 3: 1B is Llama 3.2 1B with an untied output and rope factor 8 (its config.json);
    # 8B is Llama 3.1 8B.
    _row("llama-guard-3-1b", "meta-llama/Llama-Guard-3-1B config.json", "1.50B", chat_format="llama3",
         max_seq_len=131072, rope_scaling=LLAMA31_ROPE, **_L3, **_L32_1B),
    _row("llama-guard-3-8b", "meta-llama/Llama-Guard-3-8B params.json", "8.03B", chat_format="llama3",
         max_seq_len=131072, rope_scaling=LLAMA31_ROPE, **_L3, **_L3_8B),
    # Llama 3.2 Vision: the Llama 3.1 8B / 70B decoder plus 8 / 20 gated cross-attention layers and the ViT-H/14
    # tiled encoder on 560-pixel tiles (params.json vision_chunk_size 560, vision_num_cross_attention_layers;
    # the encoder's sizes are constants of llama-models). Sizes: the model card states 10.6B and 88.8B; the
    # released weights count 10.67B and 88.6B (Hugging Face model pages), which the 90B rows cite. The counts
    # here store the aspect-ratio embeddings per supported ratio (model/vision_mllama.py), 16.4M fewer than
    # Meta's 4x4 grids and 8.2M fewer than transformers' tables with a padding row.
    *_variants("llama-3.2-11b-vision", {"": None, "-instruct": "llama3"},
               "meta-llama/Llama-3.2-11B-Vision{suffix} params.json", "10.6B", arch="mllama",
               vision=VisionConfig(image_size=560, n_cross_attention_layers=8), max_seq_len=131072,
               rope_scaling=LLAMA31_ROPE, **_L3, **_L3_8B),
    *_variants("llama-3.2-90b-vision", {"": None, "-instruct": "llama3"},
               "meta-llama/Llama-3.2-90B-Vision{suffix} params.json (size: Hugging Face model page)", "88.6B",
               arch="mllama", vision=VisionConfig(image_size=560, n_cross_attention_layers=20), max_seq_len=131072,
               rope_scaling=LLAMA31_ROPE, **_L3, **_L3_70B),
    _row("llama-guard-3-11b-vision", "meta-llama/Llama-Guard-3-11B-Vision params.json (size: model page)", "10.7B",
         chat_format="llama3", arch="mllama", vision=VisionConfig(image_size=560, n_cross_attention_layers=8),
         max_seq_len=131072, rope_scaling=LLAMA31_ROPE, **_L3, **_L3_8B),
]
