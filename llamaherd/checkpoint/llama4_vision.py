"""Llama 4's vision tower in checkpoints: Meta's names are ours; Hugging Face's (Llama4ForConditionalGeneration's
`vision_model.*` and `multi_modal_projector.*`) map onto them; params.json `vision_args` and config.json
`vision_config` give the configuration."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, Llama4VisionConfig
from ..errors import CheckpointError

ENC = "vision_embeddings.vision_encoder."
_HF_TOP = {
    "patch_embedding.linear.weight": ENC + "conv1._linear.weight",
    "class_embedding": ENC + "class_embedding",
    "positional_embedding_vlm": ENC + "positional_embedding_vlm",
    "layernorm_pre.weight": ENC + "ln_pre.weight", "layernorm_pre.bias": ENC + "ln_pre.bias",
    "layernorm_post.weight": ENC + "ln_post.weight", "layernorm_post.bias": ENC + "ln_post.bias",
    "vision_adapter.mlp.fc1.weight": "vision_embeddings.vision_adapter.mlp.c_fc.weight",
    "vision_adapter.mlp.fc2.weight": "vision_embeddings.vision_adapter.mlp.c_proj.weight",
}
_HF_LAYER = {  # transformers Llama4VisionEncoderLayer -> Meta _TransformerBlock; q/k rows are not permuted:
    # both rotate adjacent pairs (transformers `vision_apply_rotary_emb` uses complex pairs too)
    **{f"self_attn.{p}_proj.{b}": f"attn.w{p}.{b}" for p in "qkvo" for b in ("weight", "bias")},
    **{f"mlp.fc1.{b}": f"mlp.c_fc.{b}" for b in ("weight", "bias")},
    **{f"mlp.fc2.{b}": f"mlp.c_proj.{b}" for b in ("weight", "bias")},
    **{f"input_layernorm.{b}": f"ln_1.{b}" for b in ("weight", "bias")},
    **{f"post_attention_layernorm.{b}": f"ln_2.{b}" for b in ("weight", "bias")},
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def is_vision_tensor(hf_name: str) -> bool:
    return re.match(r"^(model\.)?(vision_model|multi_modal_projector)\.", hf_name) is not None


def hf_to_meta(state_dict: dict[str, torch.Tensor], source: object = None) -> dict[str, torch.Tensor]:
    """The vision tensors of a Llama4ForConditionalGeneration state dict (transformers 4 or 5 prefixes) in our
    names; other tensors are left out."""
    out = {}
    for name, t in state_dict.items():
        if not is_vision_tensor(name):
            continue
        name = name.removeprefix("model.")
        if name == "multi_modal_projector.linear_1.weight":
            out["vision_projection.weight"] = t
            continue
        leaf = name.removeprefix("vision_model.")
        m = _LAYER.match(leaf)
        try:
            out[f"{ENC}transformer.resblocks.{m.group(1)}.{_HF_LAYER[m.group(2)]}" if m else _HF_TOP[leaf]] = t
        except KeyError:
            raise CheckpointError(source, f"unknown Llama 4 vision tensor name {name!r}") from None
    return out


def config_from_params(vision_args: dict[str, Any], *, source: str | Path = "params.json") -> Llama4VisionConfig:
    """params.json `vision_args` (llama-models `VisionArgs`: sizes as {"height", "width"})."""
    try:
        size, patch = vision_args["image_size"], vision_args["patch_size"]
        if size["height"] != size["width"] or patch["height"] != patch["width"]:
            raise CheckpointError(source, "non-square vision tiles or patches are not supported")
        return Llama4VisionConfig(
            image_size=int(size["height"]), patch_size=int(patch["height"]), width=int(vision_args["dim"]),
            n_layers=int(vision_args["n_layers"]), n_heads=int(vision_args["n_heads"]),
            mlp_ratio=float(vision_args["mlp_ratio"]), output_dim=int(vision_args["output_dim"]),
            pixel_shuffle_ratio=float(vision_args["pixel_shuffle_ratio"]),
        )
    except KeyError as exc:
        raise CheckpointError(source, f"vision_args lacks {exc.args[0]!r}") from None
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(source, f"vision_args are inconsistent: {exc}") from None


def config_from_hf(vision_config: dict[str, Any], *, source: str | Path = "config.json") -> Llama4VisionConfig:
    """config.json `vision_config` (transformers `Llama4VisionConfig`)."""
    try:
        width = int(vision_config["hidden_size"])
        ratio = float(vision_config["pixel_shuffle_ratio"])
        if int(vision_config["intermediate_size"]) != int(width / ratio**2):
            # transformers reuses intermediate_size as the adapter's input width (width / ratio^2)
            raise CheckpointError(source, "vision intermediate_size differs from hidden_size / pixel_shuffle_ratio^2")
        if int(vision_config["projector_input_dim"]) != int(vision_config["projector_output_dim"]):
            raise CheckpointError(source, "projector_input_dim differs from projector_output_dim (Meta's adapter is "
                                  "square after its first layer)")
        rope = vision_config.get("rope_parameters") or {}
        return Llama4VisionConfig(
            image_size=int(vision_config["image_size"]), patch_size=int(vision_config["patch_size"]), width=width,
            n_layers=int(vision_config["num_hidden_layers"]), n_heads=int(vision_config["num_attention_heads"]),
            mlp_ratio=int(vision_config["intermediate_size"]) / width,
            output_dim=int(vision_config["projector_output_dim"]), pixel_shuffle_ratio=ratio,
            rope_theta=float(rope.get("rope_theta", vision_config.get("rope_theta", 10000.0))),
            norm_eps=float(vision_config.get("norm_eps", 1e-5)),
        )
    except KeyError as exc:
        raise CheckpointError(source, f"vision_config lacks {exc.args[0]!r}") from None
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(source, f"vision_config is inconsistent: {exc}") from None
