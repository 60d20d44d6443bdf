"""Llama 1-3 checkpoints: Meta <-> Hugging Face (LlamaForCausalLM) <-> GGUF names, configs, the q/k permutation.

Canonical names are Meta's (llama-models `llama3/model.py`). HF's LlamaAttention rotates halves where Meta
rotates adjacent pairs, so HF checkpoints store wq/wk with each head's rows permuted (transforms.py); GGUF
keeps Meta's layout (llama.cpp's convert_hf_to_gguf.py un-permutes them), so GGUF tensors need no transform.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..config import ConfigError, ModelConfig, RopeScaling
from ..errors import CheckpointError
from .names import invert, rename
from .transforms import drop_tied_output, permute_to_hf, renamed, unpermute_from_hf

Tensors = dict[str, torch.Tensor]

MODEL_TYPES = ("llama",)  # config.json model_type values this module reads
HF_CLASS, HF_MODEL_TYPE = "LlamaForCausalLM", "llama"  # what it writes

# HF LlamaForCausalLM name -> Meta name (torchtune's `_FROM_HF`, transformers' convert_llama_weights_to_hf.py).
HF_NAMES: dict[str, str] = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attention.wq.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attention.wk.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attention.wv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attention.wo.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.feed_forward.w1.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.feed_forward.w2.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w3.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
}
# GGUF name -> Meta name (gguf-py `constants.py` TENSOR_NAMES for MODEL_ARCH.LLAMA).
GGUF_NAMES: dict[str, str] = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.attention_norm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.attention.wq.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.attention.wk.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.attention.wv.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attention.wo.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.ffn_norm.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.feed_forward.w1.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.feed_forward.w3.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.feed_forward.w2.weight",
}
_TO_HF = invert(HF_NAMES)

# HF checkpoints may carry these buffers (old transformers saved them); they hold no weights.
HF_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


# -- tensors -------------------------------------------------------------------------------------------------


def _rope_heads(meta_name: str, config: ModelConfig) -> int | None:
    """Heads of wq / wk (whose rows HF permutes for rotate-half RoPE); None for every other tensor."""
    if meta_name.endswith("attention.wq.weight"):
        return config.n_heads
    if meta_name.endswith("attention.wk.weight"):
        return config.n_kv_heads
    return None


def hf_to_meta(state_dict: Tensors, config: ModelConfig, source: object = None) -> Tensors:
    """LlamaForCausalLM tensors -> Meta names, wq/wk un-permuted back to Meta's interleaved RoPE layout."""
    out: Tensors = {}
    for name, t in state_dict.items():
        if HF_IGNORED.fullmatch(name):
            continue
        meta = rename(name, HF_NAMES)
        if meta is None:
            raise CheckpointError(source, f"unknown Hugging Face tensor name {name!r}; this reader knows the Llama "
                                  f"names {sorted(HF_NAMES)}")
        heads = _rope_heads(meta, config)
        if heads is not None:
            if t.dim() != 2 or t.shape[0] != heads * config.head_dim:
                raise CheckpointError(
                    source, f"tensor {name} has shape {tuple(t.shape)}, config.json implies "
                    f"({heads * config.head_dim}, {config.dim}); the weights do not belong to this config.json",
                )
            t = unpermute_from_hf(t, heads)
        out[meta] = t
    return drop_tied_output(out, config.tie_embeddings, source)


def meta_to_hf(state_dict: Tensors, config: ModelConfig, source: object = None) -> Tensors:
    """Meta tensors -> LlamaForCausalLM names, wq/wk permuted to HF's rotate-half layout; the inverse of hf_to_meta."""
    permuted = {name: t if (heads := _rope_heads(name, config)) is None else permute_to_hf(t, heads)
                for name, t in state_dict.items()}
    return renamed(permuted, _TO_HF, config.tie_embeddings, source, "a Llama model")


def from_gguf(canonical_name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A GGUF tensor as the model stores it: GGUF holds Meta's layout, so unchanged."""
    return tensor


to_gguf = from_gguf


# -- configurations ------------------------------------------------------------------------------------------


def rope_from_hf(cfg: dict[str, Any], source: object) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from either transformers 4's rope_theta + rope_scaling or 5's rope_parameters."""
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = cfg.get("rope_theta", rp.get("rope_theta", 10000.0))
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind in (None, "default"):
        return float(theta), None
    if kind == "linear":
        return float(theta), RopeScaling(kind="linear", factor=float(rp["factor"]))
    if kind == "llama3":
        # The factor comes from the file: Llama 3.2 1B/3B HF configs state 32, Llama 3.1 states 8.
        return float(theta), RopeScaling(
            kind="llama3", factor=float(rp["factor"]), low_freq_factor=float(rp.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rp.get("high_freq_factor", 4.0)),
            original_max_position=int(rp.get("original_max_position_embeddings", 8192)),
        )
    raise CheckpointError(source, f"rope type {kind!r} is not supported; known: 'default', 'linear', 'llama3'")


def config_from_hf(cfg: dict[str, Any], *, source: object = "config.json") -> ModelConfig:
    """ModelConfig from a LlamaForCausalLM config.json dict."""
    if cfg.get("model_type", "llama") != "llama":
        raise CheckpointError(source, f"model_type {cfg.get('model_type')!r} is not 'llama'; this reader handles Llama")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if key not in cfg:
            raise CheckpointError(source, f"lacks {key!r}, which every LlamaForCausalLM config.json states")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise CheckpointError(source, f"{key} is true; Llama models have no biases and this reader loads none")
    try:
        theta, scaling = rope_from_hf(cfg, source)
        return ModelConfig(
            arch="llama",
            dim=int(cfg["hidden_size"]),
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=int(cfg["num_attention_heads"]),
            n_kv_heads=cfg.get("num_key_value_heads"),
            vocab_size=int(cfg["vocab_size"]),
            hidden_dim=int(cfg["intermediate_size"]),
            head_dim=cfg.get("head_dim"),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )
    except (ConfigError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(source, f"is inconsistent: {exc}") from None


def config_to_hf(c: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> a config.json that transformers 4.45+ and 5 read as LlamaForCausalLM (legacy rope_scaling)."""
    if c.arch != "llama":
        raise ConfigError(f"a LlamaForCausalLM config needs arch 'llama', not {c.arch!r}")
    s = c.rope_scaling
    scaling = None
    if s is not None and s.kind == "linear":
        scaling = {"rope_type": "linear", "factor": s.factor}
    elif s is not None:
        scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                   "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_position}
    return {
        "hidden_act": "silu", "hidden_size": c.dim, "intermediate_size": c.hidden_dim,
        "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim, "vocab_size": c.vocab_size, "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "rope_scaling": scaling,
        "tie_word_embeddings": c.tie_embeddings, "attention_bias": False, "mlp_bias": False,
    }
