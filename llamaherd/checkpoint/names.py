"""Tensor-name tables: Hugging Face Llama names <-> Meta's canonical names, as data."""

from __future__ import annotations

import re

from ..errors import CheckpointError

# HF LlamaForCausalLM name -> Meta llama-models name; "{}" is the layer index.
# (Same mapping as torchtune's `_FROM_HF` and transformers' convert_llama_weights_to_hf.py.)
HF_TO_META: dict[str, str] = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
}
META_TO_HF: dict[str, str] = {v: k for k, v in HF_TO_META.items()}

# HF checkpoints may carry these buffers (old transformers saved them); they hold no weights.
HF_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

_LAYER = re.compile(r"\.(\d+)\.")


def _template(name: str) -> tuple[str, str | None]:
    """'model.layers.7.mlp.up_proj.weight' -> ('model.layers.{}.mlp.up_proj.weight', '7')."""
    m = _LAYER.search(name)
    if m is None:
        return name, None
    return name[: m.start()] + ".{}." + name[m.end() :], m.group(1)


def _translate(name: str, table: dict[str, str], source: object, kind: str) -> str:
    template, layer = _template(name)
    try:
        target = table[template]
    except KeyError:
        raise CheckpointError(
            source, f"unknown {kind} tensor name {name!r}; this reader knows the Llama names {sorted(table)}"
        ) from None
    return target.format(layer) if layer is not None else target


def hf_to_meta(name: str, source: object = None) -> str:
    """The Meta name of an HF tensor name; an unknown name raises CheckpointError naming `source`."""
    return _translate(name, HF_TO_META, source, "Hugging Face")


def meta_to_hf(name: str, source: object = None) -> str:
    """The HF name of a Meta tensor name."""
    return _translate(name, META_TO_HF, source, "Meta")


def is_rope_projection(meta_name: str) -> str | None:
    """'q' or 'k' when the tensor is wq/wk (whose rows HF permutes for rotate-half RoPE), else None."""
    if meta_name.endswith("attention.wq.weight"):
        return "q"
    if meta_name.endswith("attention.wk.weight"):
        return "k"
    return None
