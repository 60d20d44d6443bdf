"""The valid checkpoint folders the fuzz targets start from, and what a user's load does with one (shared by
bench/fuzz_loaders.py and bench/fuzz_inputs.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llamaherd.config import ModelConfig

CONFIG = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, multiple_of=16, max_seq_len=32)


def hf_folder(root: Path) -> Path:
    """A tiny Hugging Face Llama folder written with safetensors and plain JSON (not with llamaherd's writer)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    c = CONFIG
    kv = c.n_kv_heads * c.head_dim
    shapes = {"model.embed_tokens.weight": (c.vocab_size, c.dim), "model.norm.weight": (c.dim,),
              "lm_head.weight": (c.vocab_size, c.dim)}
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (c.dim, c.dim), p + "self_attn.k_proj.weight": (kv, c.dim),
                       p + "self_attn.v_proj.weight": (kv, c.dim), p + "self_attn.o_proj.weight": (c.dim, c.dim),
                       p + "mlp.gate_proj.weight": (c.hidden_dim, c.dim), p + "mlp.up_proj.weight": (c.hidden_dim, c.dim),
                       p + "mlp.down_proj.weight": (c.dim, c.hidden_dim), p + "input_layernorm.weight": (c.dim,),
                       p + "post_attention_layernorm.weight": (c.dim,)})
    root.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.randn(s) for k, s in shapes.items()}, root / "model.safetensors", metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": c.dim,
        "intermediate_size": c.hidden_dim, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads, "vocab_size": c.vocab_size, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": c.max_seq_len, "tie_word_embeddings": False,
        "torch_dtype": "float32"}))
    return root


def meta_folder(root: Path) -> Path:
    """A tiny Meta folder: params.json + consolidated.00.pth."""
    from llamaherd.model import build

    torch.manual_seed(0)
    c = CONFIG
    root.mkdir(parents=True, exist_ok=True)
    torch.save(build(c).state_dict(), root / "consolidated.00.pth")
    (root / "params.json").write_text(json.dumps({
        "dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
        "vocab_size": c.vocab_size, "multiple_of": c.multiple_of, "ffn_dim_multiplier": None, "norm_eps": 1e-5,
        "rope_theta": 10000.0, "use_scaled_rope": False}))
    return root


def load_folder(folder: Path) -> None:
    """What a user's load does with a checkpoint: read it and build the model from it."""
    from llamaherd.checkpoint import materialize, read

    net = materialize(read(folder))
    assert all(p.device.type == "cpu" for p in net.parameters())
