"""Gemma 3 text checkpoints: HF (Gemma3ForCausalLM, ...ForConditionalGeneration) <-> canonical <-> GGUF names, configs.

HF tensors map one to one through `HF_NAMES`, with no transform at all:
  * norms: HF's `Gemma3RMSNorm` stores w and scales by (1 + w) (transformers `modeling_gemma3.py`); our
    `GemmaRMSNorm` does the same, so norm weights are copied unchanged. (Only GGUF differs: llama.cpp's
    converter stores 1 + w, `data_torch = data_torch + 1` for every Gemma `norm.weight` in
    convert_hf_to_gguf.py; `from_gguf` / `to_gguf` move by one.)
  * q/k: Gemma's rotary embedding rotates halves in HF, Google's checkpoints and our model alike: no permute.
Multimodal checkpoints (model_type "gemma3", Gemma3ForConditionalGeneration: 4B, 12B, 27B) nest the decoder:
tensors `language_model.model.*` (transformers 4 and 5 `save_pretrained`) or `model.language_model.*`
(transformers 5 module names), config under `text_config`. Their vision tower (`vision_tower.*`) and
projector (`multi_modal_projector.*`) are NOT loaded: llamaherd runs Gemma 3's text decoder only, so image
inputs are unsupported; `hf_to_meta` drops them and logs how many it dropped.

hf.py and gguf.py read and write through this module's tables and functions (keyed on config.arch).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..config import ConfigError, ModelConfig, RopeScaling
from ..errors import CheckpointError
from ..model.gemma3 import is_global_layer
from .names import invert, rename
from .transforms import drop_tied_output, renamed

Tensors = dict[str, torch.Tensor]
log = logging.getLogger(__name__)

MODEL_TYPES = ("gemma3_text", "gemma3")  # Gemma3ForCausalLM / Gemma3ForConditionalGeneration
HF_CLASS, HF_MODEL_TYPE = "Gemma3ForCausalLM", "gemma3_text"  # what the writer states (a text-only checkpoint)

# GGUF tensor name -> canonical name ("{i}" is the layer index). llama.cpp `gguf-py/gguf/tensor_mapping.py`.
GGUF_NAMES: dict[str, str] = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",  # absent in GGUF files of tied models (all released Gemma 3)
    "blk.{i}.attn_norm.weight": "layers.{i}.attention_norm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.attention.wq.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.attention.wk.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.attention.wv.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attention.wo.weight",
    "blk.{i}.attn_q_norm.weight": "layers.{i}.attention.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "layers.{i}.attention.k_norm.weight",
    "blk.{i}.post_attention_norm.weight": "layers.{i}.post_attention_norm.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.ffn_norm.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.feed_forward.w1.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.feed_forward.w3.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.feed_forward.w2.weight",
    "blk.{i}.post_ffw_norm.weight": "layers.{i}.post_ffn_norm.weight",
}

# HF Gemma3ForCausalLM name -> canonical name. transformers `models/gemma3/modeling_gemma3.py`.
HF_NAMES: dict[str, str] = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attention.wq.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attention.wk.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attention.wv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attention.wo.weight",
    "model.layers.{i}.self_attn.q_norm.weight": "layers.{i}.attention.q_norm.weight",
    "model.layers.{i}.self_attn.k_norm.weight": "layers.{i}.attention.k_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.post_attention_norm.weight",
    "model.layers.{i}.pre_feedforward_layernorm.weight": "layers.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.feed_forward.w1.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w3.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.feed_forward.w2.weight",
    "model.layers.{i}.post_feedforward_layernorm.weight": "layers.{i}.post_ffn_norm.weight",
}

# What llama.cpp's converter adds to every Gemma norm weight when it writes GGUF.
GGUF_NORM_OFFSET = 1.0


def is_norm(canonical_name: str) -> bool:
    return canonical_name.endswith("norm.weight")


def from_gguf(canonical_name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A GGUF tensor (already renamed to `canonical_name`) as this model stores it: norms lose llama.cpp's +1."""
    if is_norm(canonical_name):
        return tensor.float() - GGUF_NORM_OFFSET
    return tensor


def to_gguf(canonical_name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The inverse of `from_gguf`, for GGUF writers: norms gain llama.cpp's +1 (in float32)."""
    if is_norm(canonical_name):
        return tensor.float() + GGUF_NORM_OFFSET
    return tensor

# Values transformers' Gemma3TextConfig takes for fields a config.json leaves out (`configuration_gemma3.py`).
# Released multimodal configs rely on them: google/gemma-3-4b-it's text_config states only hidden_size,
# intermediate_size, num_hidden_layers, rope_scaling and sliding_window.
HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    "query_pre_attn_scalar": 256, "sliding_window": 4096, "sliding_window_pattern": 6,
    "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,  # Gemma3TextConfig.default_theta
}

# Tensor-name prefixes of a multimodal checkpoint: the decoder's (-> plain Gemma3ForCausalLM names) and the
# image parts, which are skipped.
_TEXT_PREFIXES = {
    "language_model.model.": "model.", "language_model.lm_head.": "lm_head.",
    "model.language_model.": "model.",
}
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")

_TO_HF = invert(HF_NAMES)


# -- state dicts ---------------------------------------------------------------------------------------------


def hf_to_meta(state_dict: Tensors, config: ModelConfig, source: object = None) -> Tensors:
    """Gemma3ForCausalLM (or the text decoder of Gemma3ForConditionalGeneration) tensors -> canonical names."""
    out: Tensors = {}
    skipped = 0
    for name, t in state_dict.items():
        if name.startswith(_VISION_PREFIXES):
            skipped += 1
            continue
        for prefix, plain in _TEXT_PREFIXES.items():
            if name.startswith(prefix):
                name = plain + name[len(prefix):]
                break
        canonical = rename(name, HF_NAMES)
        if canonical is None:
            raise CheckpointError(source, f"tensor {name!r} is not part of a Gemma 3 text model (Gemma3ForCausalLM)")
        if canonical in out:
            raise CheckpointError(source, f"tensor {name!r} appears twice (under two prefixes); remove the duplicate")
        out[canonical] = t
    if skipped:
        log.info("Gemma 3: skipped %d vision tensors (vision_tower.*, multi_modal_projector.*); "
                 "llamaherd loads the text decoder only", skipped)
    return drop_tied_output(out, config.tie_embeddings, source)


def meta_to_hf(state_dict: Tensors, config: ModelConfig, source: object = None) -> Tensors:
    """Canonical Gemma 3 tensors -> Gemma3ForCausalLM names (a text-only checkpoint), unchanged in value."""
    return renamed(state_dict, _TO_HF, config.tie_embeddings, source, "a Gemma 3 text model")


# -- configurations ------------------------------------------------------------------------------------------


def _field(c: dict[str, Any], key: str) -> Any:
    v = c.get(key)
    return HF_DEFAULTS[key] if v is None else v


def _global_every(layer_types: list[Any], n_layers: int, source: str) -> int:
    """The n such that layer i is "full_attention" exactly when (i + 1) % n == 0 (our periodic pattern)."""
    kinds = list(layer_types)[:n_layers]
    if len(kinds) != n_layers or not set(kinds) <= {"full_attention", "sliding_attention"}:
        raise CheckpointError(source, f"layer_types must name 'full_attention' or 'sliding_attention' for each of "
                              f"the {n_layers} layers; got {layer_types!r}")
    full = [i for i, kind in enumerate(kinds) if kind == "full_attention"]
    n = full[0] + 1 if full else n_layers + 1  # no global layer: a period longer than the model
    if full != list(range(n - 1, n_layers, n)):
        raise CheckpointError(source, f"layer_types {kinds} is not every n-th layer global; llamaherd supports "
                              "periodic local/global patterns only")
    return n


def _rope(c: dict[str, Any], source: str) -> tuple[float, float, RopeScaling | None]:
    """(global theta, local theta, global scaling) from transformers 5's per-layer-type rope_parameters, or
    transformers 4's rope_theta / rope_local_base_freq / rope_scaling."""
    rp = c.get("rope_parameters")
    if isinstance(rp, dict) and ("full_attention" in rp or "sliding_attention" in rp):
        full, local = rp.get("full_attention") or {}, rp.get("sliding_attention") or {}
    else:
        full = dict(c.get("rope_scaling") or {}, rope_theta=c.get("rope_theta"))
        local = {"rope_theta": c.get("rope_local_base_freq")}
    if local.get("rope_type", local.get("type", "default")) != "default":
        raise CheckpointError(source, f"sliding-attention rope type {local.get('rope_type')!r} is not supported; "
                              "Gemma 3 scales only the global layers' rope")
    kind = full.get("rope_type", full.get("type", "default"))
    if kind not in ("default", "linear"):
        raise CheckpointError(source, f"rope type {kind!r} is not supported for Gemma 3; known: 'default', 'linear'")
    scaling = RopeScaling(kind="linear", factor=float(full["factor"])) if kind == "linear" else None
    theta = full.get("rope_theta")
    local_theta = local.get("rope_theta")
    return (float(HF_DEFAULTS["rope_theta"] if theta is None else theta),
            float(HF_DEFAULTS["rope_local_base_freq"] if local_theta is None else local_theta), scaling)


def config_from_hf(cfg: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
    """A Gemma3ForCausalLM config.json ("gemma3_text"), or the text_config of a "gemma3" one, -> ModelConfig."""
    if cfg.get("model_type") not in MODEL_TYPES:
        raise CheckpointError(source, f"model_type {cfg.get('model_type')!r} is not one of {MODEL_TYPES}")
    c = (cfg.get("text_config") or {}) if cfg.get("model_type") == "gemma3" else cfg
    if not isinstance(c, dict):
        raise CheckpointError(source, "text_config must be a JSON object")
    if c.get("tie_word_embeddings") is None and "tie_word_embeddings" in cfg:
        c = {**c, "tie_word_embeddings": cfg["tie_word_embeddings"]}  # multimodal: stated on the outer config
    act = c.get("hidden_activation") or c.get("hidden_act") or HF_DEFAULTS["hidden_activation"]
    if act != "gelu_pytorch_tanh":
        raise CheckpointError(source, f"hidden_activation {act!r} is not supported; Gemma 3 uses gelu_pytorch_tanh")
    if c.get("attention_bias"):
        raise CheckpointError(source, "attention_bias is true; Gemma 3 has no biases and this reader loads none")
    if c.get("use_bidirectional_attention"):
        raise CheckpointError(source, "use_bidirectional_attention is true (an embedding model such as "
                              "EmbeddingGemma); llamaherd runs causal decoders only")
    try:
        n_layers = int(_field(c, "num_hidden_layers"))
        window = c.get("sliding_window", HF_DEFAULTS["sliding_window"])
        if c.get("layer_types"):  # transformers >= 4.53 states it; it overrides sliding_window_pattern
            pattern = _global_every(c["layer_types"], n_layers, source)
        else:
            pattern = int(_field(c, "sliding_window_pattern"))
        theta, local_theta, scaling = _rope(c, source)
        return ModelConfig(
            arch="gemma3", dim=int(_field(c, "hidden_size")), n_layers=n_layers,
            n_heads=int(_field(c, "num_attention_heads")), n_kv_heads=int(_field(c, "num_key_value_heads")),
            head_dim=int(_field(c, "head_dim")), vocab_size=int(_field(c, "vocab_size")),
            hidden_dim=int(_field(c, "intermediate_size")), norm_eps=float(_field(c, "rms_norm_eps")),
            rope_theta=theta, rope_scaling=scaling, rope_local_theta=local_theta,
            max_seq_len=int(_field(c, "max_position_embeddings")),
            tie_embeddings=bool(_field(c, "tie_word_embeddings")),
            sliding_window=None if window is None else int(window), sliding_window_pattern=pattern,
            query_pre_attn_scalar=float(_field(c, "query_pre_attn_scalar")),
            final_logit_softcap=_float_or_none(c.get("final_logit_softcapping")),
            attn_logit_softcap=_float_or_none(c.get("attn_logit_softcapping")),
        )
    except (ConfigError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(source, f"is inconsistent: {exc}") from None


def _float_or_none(v: Any) -> float | None:
    return None if v is None else float(v)


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> keyword arguments of transformers' Gemma3TextConfig (and a text-only config.json).

    Both spellings are written: transformers 5 reads rope_parameters and layer_types, transformers 4.50+
    reads rope_theta, rope_local_base_freq, rope_scaling and sliding_window_pattern.
    """
    if config.arch != "gemma3":
        raise ConfigError(f"config_to_hf needs a Gemma 3 config, got arch {config.arch!r}")
    full: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    scaling = None
    if config.rope_scaling is not None:
        if config.rope_scaling.kind != "linear":
            raise ConfigError(f"Gemma 3 HF configs take linear rope scaling, not {config.rope_scaling.kind!r}")
        scaling = {"rope_type": "linear", "factor": config.rope_scaling.factor}
        full.update(scaling)
    local_theta = config.rope_local_theta or config.rope_theta
    n = config.n_layers
    out = dict(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.hidden_dim,
        num_hidden_layers=n, num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim, hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings, attention_bias=False,
        query_pre_attn_scalar=_number(config.query_pre_attn_scalar or config.head_dim),
        sliding_window=config.sliding_window,
        layer_types=["full_attention" if is_global_layer(config, i) else "sliding_attention" for i in range(n)],
        final_logit_softcapping=config.final_logit_softcap, attn_logit_softcapping=config.attn_logit_softcap,
        rope_parameters={"full_attention": full,
                         "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}},
        rope_theta=config.rope_theta, rope_local_base_freq=local_theta, rope_scaling=scaling,
    )
    if config.sliding_window_pattern:
        out["sliding_window_pattern"] = config.sliding_window_pattern
    return out
