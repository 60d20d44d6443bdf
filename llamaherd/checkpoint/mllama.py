"""Llama 3.2 Vision checkpoints: Meta and Hugging Face (MllamaForConditionalGeneration) names, configs, tensors.

Our names are Meta's (llama-models `llama3/multimodal/model.py`), except the aspect-ratio embeddings, kept per
supported aspect ratio (model/vision_mllama.py `TilePositionEmbedding` says why).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, ModelConfig, RopeScaling, VisionConfig
from ..errors import CheckpointError
from ..model import build
from ..model.mllama import N_LEARNABLE_EMBEDDINGS, fusion_schedule
from ..model.vision_mllama import supported_aspect_ratios
from .base import Checkpoint, attach_tokenizer
from .llama import rope_from_hf
from .pth import TOKENIZER_FILES, load_pth, shard_files
from .transforms import merge_shards, permute_to_hf, unpermute_from_hf

MODEL_TYPES = ("mllama",)  # MllamaForConditionalGeneration
HF_CLASS, HF_MODEL_TYPE = "MllamaForConditionalGeneration", "mllama"
VE = "vision_model.vision_encoder."
# Meta's per-grid embeddings, converted to per-ratio tables.
GRID_TABLES = (VE + "pre_tile_pos_embed.embedding", VE + "post_tile_pos_embed.embedding",
               VE + "gated_positional_embedding")


# -- configs ---------------------------------------------------------------------------------------


def config_from_meta_params(params: dict[str, Any], *, source: str | Path = "params.json") -> ModelConfig:
    """A Llama 3.2 Vision params.json (llama-models `llama3/args.py`: the text fields plus vision_chunk_size,
    vision_max_num_chunks, vision_num_cross_attention_layers). The encoder's other sizes are Meta's constants."""
    try:
        vision = VisionConfig(
            image_size=int(params["vision_chunk_size"]),
            max_num_tiles=int(params.get("vision_max_num_chunks", 4)),
            n_cross_attention_layers=int(params["vision_num_cross_attention_layers"]),
        )
        # Meta's reference hard-codes factor 8 in apply_scaling (llama-models llama3/model.py).
        scaling = RopeScaling(kind="llama3", factor=8.0) if params.get("use_scaled_rope") else None
        return ModelConfig(
            arch="mllama", dim=int(params["dim"]), n_layers=int(params["n_layers"]), n_heads=int(params["n_heads"]),
            n_kv_heads=params.get("n_kv_heads"), vocab_size=int(params["vocab_size"]),
            multiple_of=int(params.get("multiple_of", 256)), ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
            norm_eps=float(params.get("norm_eps", 1e-5)), rope_theta=float(params.get("rope_theta", 500000.0)),
            rope_scaling=scaling, max_seq_len=int(params.get("max_seq_len", 131072)), vision=vision,
        )
    except KeyError as exc:
        raise CheckpointError(source, f"lacks {exc.args[0]!r}, which a Llama 3.2 Vision params.json states") from None
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(source, f"is inconsistent: {exc}") from None


def config_from_hf(cfg: dict[str, Any], *, source: str | Path = "config.json") -> ModelConfig:
    """An MllamaForConditionalGeneration config.json (transformers `MllamaConfig`)."""
    if cfg.get("model_type") != "mllama":
        raise CheckpointError(source, f"model_type {cfg.get('model_type')!r} is not 'mllama'")
    try:
        t, v = cfg["text_config"], cfg["vision_config"]
        n_total = int(t["num_hidden_layers"])
        cross = [int(i) for i in t["cross_attention_layers"]]
        n_text = n_total - len(cross)
        # HF interleaves the cross layers into one list; Meta's schedule must put each before the same text layer.
        expected = [j + k for k, j in enumerate(fusion_schedule(n_text, len(cross)))]
        if cross != expected:
            raise CheckpointError(source, f"cross_attention_layers {cross} are not Meta's schedule {expected}")
        ratios = [tuple(r) for r in v.get("supported_aspect_ratios") or supported_aspect_ratios(v["max_num_tiles"])]
        if ratios != supported_aspect_ratios(int(v["max_num_tiles"])):
            raise CheckpointError(source, f"supported_aspect_ratios {ratios} are not the standard list")
        if v.get("hidden_act", "gelu") != "gelu" or t.get("hidden_act", "silu") != "silu":
            raise CheckpointError(source, "activations other than gelu (vision) / silu (text) are not supported")
        width = int(v["hidden_size"])
        vision = VisionConfig(
            image_size=int(v["image_size"]), patch_size=int(v["patch_size"]), max_num_tiles=int(v["max_num_tiles"]),
            width=width, n_layers=int(v["num_hidden_layers"]), n_global_layers=int(v["num_global_layers"]),
            n_heads=int(v["attention_heads"]), mlp_ratio=int(v["intermediate_size"]) / width,
            intermediate_layers=tuple(int(i) for i in v["intermediate_layers_indices"]),
            n_cross_attention_layers=len(cross), norm_eps=float(v.get("norm_eps", 1e-5)),
        )
        if int(vision.mlp_ratio * width) != int(v["intermediate_size"]):
            raise CheckpointError(source, f"vision intermediate_size {v['intermediate_size']} is not a width multiple")
        theta, scaling = rope_from_hf(t, source)
        return ModelConfig(
            arch="mllama", dim=int(t["hidden_size"]), n_layers=n_text, n_heads=int(t["num_attention_heads"]),
            n_kv_heads=t.get("num_key_value_heads"), vocab_size=int(t["vocab_size"]),
            hidden_dim=int(t["intermediate_size"]), norm_eps=float(t.get("rms_norm_eps", 1e-5)), rope_theta=theta,
            rope_scaling=scaling, max_seq_len=int(t.get("max_position_embeddings", 131072)), vision=vision,
        )
    except KeyError as exc:
        raise CheckpointError(source, f"lacks {exc.args[0]!r}, which an mllama config.json states") from None
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(source, f"is inconsistent: {exc}") from None


# -- Meta -> ours -------------------------------------------------------------------------------------


def grid_to_ratios(grid: torch.Tensor, max_num_tiles: int) -> torch.Tensor:
    """Meta's (tiles, tiles, tokens, width) grid -> (ratios, tiles, tokens, width): a rows x cols image's tile
    r*cols + c reads cell [r, c] (llama-models `TilePositionEmbedding.forward`, `apply_positional_embedding`);
    tiles past rows*cols get zeros, as Meta adds nothing there."""
    ratios = supported_aspect_ratios(max_num_tiles)
    out = grid.new_zeros(len(ratios), max_num_tiles, *grid.shape[2:])
    for i, (r, c) in enumerate(ratios):
        out[i, : r * c] = grid[:r, :c].reshape(r * c, *grid.shape[2:])
    return out


def normalize_meta(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """A Meta Llama 3.2 Vision state dict (one shard, or merged) in our names and layouts."""
    T = config.vision.max_num_tiles
    out = {}
    for name, t in state_dict.items():
        if name == "text_model.rope.freqs":  # a buffer some Meta files carry, not a weight
            continue
        if name in GRID_TABLES:
            t = grid_to_ratios(t, T)
            if name != VE + "gated_positional_embedding":
                t = t[:, :, 0]  # (ratios, tiles, 1, width) -> (ratios, tiles, width)
        out[name] = t
    return out


def read_meta(path: Path, params: dict[str, Any]):
    """A Meta Llama 3.2 Vision folder: params.json and consolidated.pth, or model-parallel consolidated.NN.pth
    shards (90B Vision ships 8), merged by fairscale's split rules (transforms.py `SHARD_RULES["mllama"]`)."""
    files = [path / "consolidated.pth"] if (path / "consolidated.pth").exists() else shard_files(path)
    config = config_from_meta_params(params, source=path / "params.json")
    sd = normalize_meta(merge_meta_shards([load_pth(f) for f in files], config, files), config)
    return Checkpoint(config=config, state_dict=sd, source=path, tokenizer=attach_tokenizer(path, TOKENIZER_FILES),
                      metadata={"format": "meta", "shards": len(files), "params": params})


def merge_meta_shards(shards: list[dict[str, torch.Tensor]], config: ModelConfig,
                      files: list[Path]) -> dict[str, torch.Tensor]:
    """Meta's model-parallel Llama 3.2 Vision shards (Meta's names and layouts) joined into one state dict.

    Up to 8 shards: past 8 ranks Meta's reference replicates attention heads (`qkvo_replication`), which these
    rules do not undo. Every split width must divide by the shard count, and the merged shapes must be the ones
    params.json implies (half a folder merges to half widths)."""
    n = len(shards)
    if n == 1:
        return dict(shards[0])
    v = config.vision
    if n > 8:
        raise CheckpointError(files[0], f"{n} model-parallel shards: past 8 Meta replicates attention heads "
                              "across ranks, which is not supported; convert the folder with Meta's tools first")
    if config.n_heads % n or config.n_kv_heads % n or v.n_heads % n or N_LEARNABLE_EMBEDDINGS % n:
        raise CheckpointError(files[0], f"{n} shards cannot split {config.n_heads} query / {config.n_kv_heads} "
                              f"key-value heads, {v.n_heads} vision heads and {N_LEARNABLE_EMBEDDINGS} learnable "
                              "embeddings evenly; the shard count does not belong to this params.json")
    sd = merge_shards(shards, config.dim, files, arch="mllama")
    expected = build(config, device="meta").state_dict()
    for name, t in sd.items():
        want = expected.get(name)
        if want is not None and name not in GRID_TABLES and tuple(t.shape) != tuple(want.shape):
            raise CheckpointError(files[0], f"{name} merges from {n} shards to {tuple(t.shape)} but params.json "
                                  f"implies {tuple(want.shape)}: the folder holds another number of shards than "
                                  "the checkpoint was written as; get the complete folder")
    return sd


# -- Hugging Face -> ours ------------------------------------------------------------------------------

_HF_VISION = {  # transformers MllamaVisionModel -> Meta VisionEncoder (after "model.vision_model.")
    "class_embedding": "class_embedding",
    "gated_positional_embedding.embedding": "positional_embedding",
    "gated_positional_embedding.gate": "gated_positional_embedding_gate",
    "pre_tile_positional_embedding.gate": "pre_tile_pos_embed.gate",
    "post_tile_positional_embedding.gate": "post_tile_pos_embed.gate",
    "layernorm_pre.weight": "ln_pre.weight", "layernorm_pre.bias": "ln_pre.bias",
    "layernorm_post.weight": "ln_post.weight", "layernorm_post.bias": "ln_post.bias",
}
_HF_VISION_LAYER = {
    "self_attn.q_proj.weight": "attn.wq.weight", "self_attn.k_proj.weight": "attn.wk.weight",
    "self_attn.v_proj.weight": "attn.wv.weight", "self_attn.o_proj.weight": "attn.wo.weight",
    "mlp.fc1.weight": "mlp.c_fc.weight", "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight", "mlp.fc2.bias": "mlp.c_proj.bias",
    "input_layernorm.weight": "ln_1.weight", "input_layernorm.bias": "ln_1.bias",
    "post_attention_layernorm.weight": "ln_2.weight", "post_attention_layernorm.bias": "ln_2.bias",
    "gate_attn": "gate_attn", "gate_ffn": "gate_ffn",
}
_HF_TEXT_LAYER = {
    "self_attn.q_proj.weight": "attention.wq.weight", "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight", "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight", "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
}
_HF_CROSS_LAYER = {
    **{k.replace("self_attn", "cross_attn"): v for k, v in _HF_TEXT_LAYER.items()},
    "cross_attn.q_norm.weight": "attention.q_norm.weight", "cross_attn.k_norm.weight": "attention.k_norm.weight",
    "cross_attn_attn_gate": "gate_attn", "cross_attn_mlp_gate": "gate_ffwd",
}
_LAYER = re.compile(r"^(model\.vision_model\.(?:global_)?transformer|model\.language_model)\.layers\.(\d+)\.(.+)$")


def hf_to_meta(state_dict: dict[str, torch.Tensor], config: ModelConfig, source: object = None) -> dict[str, torch.Tensor]:
    """An MllamaForConditionalGeneration state dict (transformers 4.45+ or 5 names) in our names and layouts."""
    c, v = config, config.vision
    sched = fusion_schedule(c.n_layers, v.n_cross_attention_layers)
    cross_at = {j + k: k for k, j in enumerate(sched)}  # HF layer index -> our cross layer index
    out: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        name = re.sub(r"^language_model\.model\.", "model.language_model.", name)  # transformers 4 spelling
        name = re.sub(r"^language_model\.lm_head\.", "lm_head.", name)
        name = re.sub(r"^(vision_model|multi_modal_projector)\.", r"model.\1.", name)
        m = _LAYER.match(name)
        if m is not None:
            stack, i, leaf = m.group(1), int(m.group(2)), m.group(3)
            if stack == "model.language_model":
                if i in cross_at:
                    out[f"text_model.cross_attention_layers.{cross_at[i]}.{_hf(_HF_CROSS_LAYER, leaf, name, source)}"] = t
                    continue
                j = i - sum(1 for x in cross_at if x < i)
                ours = _hf(_HF_TEXT_LAYER, leaf, name, source)
                if ours == "attention.wq.weight":
                    t = unpermute_from_hf(t, c.n_heads)
                elif ours == "attention.wk.weight":
                    t = unpermute_from_hf(t, c.n_kv_heads)
                out[f"text_model.layers.{j}.{ours}"] = t
            else:
                which = stack.rsplit(".", 1)[1]
                out[f"{VE}{which}.resblocks.{i}.{_hf(_HF_VISION_LAYER, leaf, name, source)}"] = t
            continue
        if name == "model.language_model.embed_tokens.weight":
            out["text_model.tok_embeddings.weight"] = t[: c.vocab_size]
            out["text_model.learnable_embedding.weight"] = t[c.vocab_size : c.vocab_size + N_LEARNABLE_EMBEDDINGS]
        elif name == "model.language_model.norm.weight":
            out["text_model.norm.weight"] = t
        elif name == "lm_head.weight":
            out["text_model.output.weight"] = t
        elif name.startswith("model.multi_modal_projector."):
            out["vision_model.vision_projection." + name.rsplit(".", 1)[1]] = t
        elif name == "model.vision_model.patch_embedding.weight":
            out[VE + "conv1._linear.weight"] = t.reshape(t.shape[0], -1)  # (width, 3, p, p) -> unfold order
        elif name == "model.vision_model.gated_positional_embedding.tile_embedding.weight":
            # (1 + ratios, tiles * tokens * width); row 0 is transformers' padding id
            out[VE + "gated_positional_embedding"] = t[1:].reshape(-1, v.max_num_tiles, v.tokens_per_tile, v.width)
        elif name.endswith("_tile_positional_embedding.embedding.weight"):
            which = "pre" if ".pre_tile" in name else "post"
            out[f"{VE}{which}_tile_pos_embed.embedding"] = t[1:].reshape(-1, v.max_num_tiles, v.width)
        elif name.startswith("model.vision_model."):
            out[VE + _hf(_HF_VISION, name[len("model.vision_model."):], name, source)] = t
        else:
            raise CheckpointError(source, f"unknown Llama 3.2 Vision tensor name {name!r}")
    return out


# -- ours -> Hugging Face ------------------------------------------------------------------------------


def meta_to_hf(state_dict: dict[str, torch.Tensor], config: ModelConfig, source: object = None) -> dict[str, torch.Tensor]:
    """Our state dict in transformers 5's MllamaForConditionalGeneration names (what its save_pretrained writes)."""
    c, v = config, config.vision
    sched = fusion_schedule(c.n_layers, v.n_cross_attention_layers)
    hf_cross = [j + k for k, j in enumerate(sched)]
    hf_text = [i for i in range(c.n_layers + len(sched)) if i not in hf_cross]
    inv = {"vision": {b: a for a, b in _HF_VISION.items()}, "vlayer": {b: a for a, b in _HF_VISION_LAYER.items()},
           "text": {b: a for a, b in _HF_TEXT_LAYER.items()}, "cross": {b: a for a, b in _HF_CROSS_LAYER.items()}}
    out: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        if name.startswith("text_model.layers."):
            i, leaf = name[len("text_model.layers."):].split(".", 1)
            if leaf == "attention.wq.weight":
                t = permute_to_hf(t, c.n_heads)
            elif leaf == "attention.wk.weight":
                t = permute_to_hf(t, c.n_kv_heads)
            out[f"model.language_model.layers.{hf_text[int(i)]}.{inv['text'][leaf]}"] = t
        elif name.startswith("text_model.cross_attention_layers."):
            k, leaf = name[len("text_model.cross_attention_layers."):].split(".", 1)
            out[f"model.language_model.layers.{hf_cross[int(k)]}.{inv['cross'][leaf]}"] = t
        elif name in ("text_model.tok_embeddings.weight", "text_model.learnable_embedding.weight"):
            continue  # joined below
        elif name == "text_model.norm.weight":
            out["model.language_model.norm.weight"] = t
        elif name == "text_model.output.weight":
            out["lm_head.weight"] = t
        elif name.startswith("vision_model.vision_projection."):
            out["model.multi_modal_projector." + name.rsplit(".", 1)[1]] = t
        elif name == VE + "conv1._linear.weight":
            out["model.vision_model.patch_embedding.weight"] = t.reshape(t.shape[0], 3, v.patch_size, v.patch_size)
        elif name == VE + "gated_positional_embedding":
            out["model.vision_model.gated_positional_embedding.tile_embedding.weight"] = _with_padding_row(t)
        elif name.endswith("_tile_pos_embed.embedding"):
            which = "pre" if ".pre_tile" in name else "post"
            out[f"model.vision_model.{which}_tile_positional_embedding.embedding.weight"] = _with_padding_row(t)
        elif m := re.match(rf"^{re.escape(VE)}(global_transformer|transformer)\.resblocks\.(\d+)\.(.+)$", name):
            out[f"model.vision_model.{m.group(1)}.layers.{m.group(2)}.{inv['vlayer'][m.group(3)]}"] = t
        elif name.startswith(VE) and name[len(VE):] in inv["vision"]:
            out["model.vision_model." + inv["vision"][name[len(VE):]]] = t
        else:
            raise CheckpointError(source, f"no Hugging Face name for {name!r}")
    out["model.language_model.embed_tokens.weight"] = torch.cat(
        [state_dict["text_model.tok_embeddings.weight"], state_dict["text_model.learnable_embedding.weight"]]
    )
    return out


def _with_padding_row(table: torch.Tensor) -> torch.Tensor:
    """(ratios, ...) -> (1 + ratios, prod(...)): transformers' row 0 is the padding id, never read."""
    flat = table.reshape(table.shape[0], -1)
    return torch.cat([flat.new_zeros(1, flat.shape[1]), flat])


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """An MllamaConfig config.json for the architecture (transformers 5 `rope_parameters` spelling)."""
    c, v = config, config.vision
    sched = fusion_schedule(c.n_layers, v.n_cross_attention_layers)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling is not None:
        s = c.rope_scaling
        rope = {"rope_type": s.kind, "rope_theta": c.rope_theta, "factor": s.factor}
        if s.kind == "llama3":
            rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                        original_max_position_embeddings=s.original_max_position)
    return {
        "image_token_index": c.vocab_size,
        "text_config": {
            "model_type": "mllama_text_model", "vocab_size": c.vocab_size, "hidden_size": c.dim,
            "num_hidden_layers": c.n_layers + len(sched), "cross_attention_layers": [j + k for k, j in enumerate(sched)],
            "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "intermediate_size": c.hidden_dim,
            "rms_norm_eps": c.norm_eps, "max_position_embeddings": c.max_seq_len, "rope_parameters": rope,
            "rope_theta": c.rope_theta, "hidden_act": "silu", "tie_word_embeddings": False,
        },
        "vision_config": {
            "model_type": "mllama_vision_model", "hidden_size": v.width, "num_hidden_layers": v.n_layers,
            "num_global_layers": v.n_global_layers, "attention_heads": v.n_heads,
            "intermediate_size": int(v.mlp_ratio * v.width), "vision_output_dim": v.output_dim,
            "image_size": v.image_size, "patch_size": v.patch_size, "max_num_tiles": v.max_num_tiles,
            "intermediate_layers_indices": list(v.intermediate_layers), "norm_eps": v.norm_eps,
            "supported_aspect_ratios": [list(r) for r in supported_aspect_ratios(v.max_num_tiles)],
            "hidden_act": "gelu",
        },
    }


def _hf(table: dict[str, str], leaf: str, name: str, source: object) -> str:
    try:
        return table[leaf]
    except KeyError:
        raise CheckpointError(source, f"unknown Llama 3.2 Vision tensor name {name!r}") from None
