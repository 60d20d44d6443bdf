"""Llama 4 text checkpoints: Meta <-> Hugging Face (Llama4ForCausalLM) tensor names, layouts and configs.

Canonical names are Meta's (llama-models `llama4/model.py`, `moe.py`). The transforms, each one function:
  * routed experts: HF `experts.gate_up_proj` (E, D, 2F) is Meta's `moe_w_in_eD_F` (gate, w1) and
    `moe_w_swiglu_eD_F` (up, w3) concatenated on the last axis, in that order (HF `Llama4TextExperts.forward`
    chunks gate first); `experts.down_proj` (E, F, D) is `moe_w_out_eF_D` as is;
  * router: HF `router.weight` is an nn.Linear weight (E, D), Meta's `router_DE` is (D, E): a transpose;
  * q/k: no permutation. HF's Llama 4 applies rotary embeddings as complex products on adjacent pairs
    (`modeling_llama4.apply_rotary_emb`), exactly as Meta does, so wq/wk are copied unchanged
    (unlike Llama 1-3, whose HF conversion permutes to rotate-half; checked by tests/test_llama4.py).
Meta's own checkpoints also come in older spellings (`experts.w1`, 2-D expert matrices, `w_in_shared_FD`);
`normalize_meta` maps them onto the canonical ones.

meta_pth.py (config_from_params, normalize_meta, params_from_config) and hf.py (config_from_hf, hf_to_meta,
meta_to_hf, config_to_hf) read and write Llama 4 through this module (keyed on config.arch == "llama4"), and so
do gguf.py / gguf_write.py (GGUF_NAMES, from_gguf / to_gguf, gguf_fields, check_gguf) in llama.cpp's "llama4"
layout: the text decoder only (llama.cpp puts the vision tower in a separate mmproj file).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..config import ConfigError, ModelConfig, MoEConfig, RopeScaling, ffn_hidden_dim, moe_hidden_dim
from ..errors import CheckpointError, GGUFError
from . import llama4_vision
from .names import invert, rename

Tensors = dict[str, torch.Tensor]

MODEL_TYPES = ("llama4_text", "llama4")  # Llama4ForCausalLM / Llama4ForConditionalGeneration
HF_CLASS, HF_MODEL_TYPE = "Llama4ForCausalLM", "llama4_text"  # what the writer states (a text-only checkpoint)

# HF Llama4ForCausalLM name -> Meta name (transformers `models/llama4/modeling_llama4.py`; llama-models
# `llama4/model.py`, `moe.py`). The router is transposed on the way; HF's fused gate_up_proj is split into
# the two Meta tensors below, which this table does not list.
HF_NAMES: dict[str, str] = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attention.wq.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attention.wk.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attention.wv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attention.wo.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
    # dense layers
    "model.layers.{i}.feed_forward.gate_proj.weight": "layers.{i}.feed_forward.w1.weight",
    "model.layers.{i}.feed_forward.up_proj.weight": "layers.{i}.feed_forward.w3.weight",
    "model.layers.{i}.feed_forward.down_proj.weight": "layers.{i}.feed_forward.w2.weight",
    # MoE layers: the shared expert, the routed experts' down projections, the router (transposed)
    "model.layers.{i}.feed_forward.shared_expert.gate_proj.weight": "layers.{i}.feed_forward.shared_expert.w1.weight",
    "model.layers.{i}.feed_forward.shared_expert.up_proj.weight": "layers.{i}.feed_forward.shared_expert.w3.weight",
    "model.layers.{i}.feed_forward.shared_expert.down_proj.weight": "layers.{i}.feed_forward.shared_expert.w2.weight",
    "model.layers.{i}.feed_forward.experts.down_proj": "layers.{i}.feed_forward.experts.moe_w_out_eF_D",
    "model.layers.{i}.feed_forward.router.weight": "layers.{i}.feed_forward.router_DE",
}
_TO_HF = invert(HF_NAMES)
_GATE, _UP = "feed_forward.experts.moe_w_in_eD_F", "feed_forward.experts.moe_w_swiglu_eD_F"
_GATE_UP = "feed_forward.experts.gate_up_proj"
_ROUTER = "feed_forward.router_DE"
VISION_PREFIXES = ("vision_embeddings.", "vision_projection.")  # Meta's names of the vision tower's tensors
# Parts of a multimodal Llama4ForConditionalGeneration checkpoint that the text decoder does not use.
_HF_NON_TEXT = ("vision_model.", "multi_modal_projector.", "model.vision_model.", "model.multi_modal_projector.")


# -- tensor transforms ---------------------------------------------------------------------------------------
def fuse_gate_up(gate_eDF: torch.Tensor, up_eDF: torch.Tensor) -> torch.Tensor:
    """Meta (E, D, F) gate and up -> HF gate_up_proj (E, D, 2F), gate first."""
    return torch.cat([gate_eDF, up_eDF], dim=-1)


def split_gate_up(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF gate_up_proj (E, D, 2F) -> Meta gate, up (E, D, F) each."""
    gate, up = gate_up.chunk(2, dim=-1)
    return gate.contiguous(), up.contiguous()


# -- state dicts ---------------------------------------------------------------------------------------------
def meta_to_hf(state_dict: Tensors, config: ModelConfig, source: object = None) -> Tensors:
    """Canonical (Meta) Llama 4 text state dict -> Llama4ForCausalLM names and layouts."""
    out: Tensors = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in state_dict.items():
        if name == "output.weight" and config.tie_embeddings:
            continue
        if name.startswith(VISION_PREFIXES):
            continue  # Llama4ForCausalLM is the text decoder: a multimodal model's vision tower is not written
        layer, _, rest = name.removeprefix("layers.").partition(".")
        if name.startswith("layers.") and rest in (_GATE, _UP):
            fused.setdefault(layer, {})[rest] = t
            continue
        hf = rename(name, _TO_HF)
        if hf is None:
            raise CheckpointError(source, f"tensor {name!r} is not part of a Llama 4 text model")
        out[hf] = t.t().contiguous() if name.endswith(_ROUTER) else t  # router (D, E) -> nn.Linear (E, D)
    for i, parts in fused.items():
        if len(parts) != 2:
            raise CheckpointError(source, f"layer {i}: {_GATE} and {_UP} must both be present to fuse gate_up_proj")
        out[f"model.layers.{i}.{_GATE_UP}"] = fuse_gate_up(parts[_GATE], parts[_UP])
    return out


def hf_to_meta(state_dict: Tensors, config: ModelConfig, source: object = None) -> Tensors:
    """Llama4ForCausalLM (or the text part of Llama4ForConditionalGeneration) -> canonical Meta names."""
    out: Tensors = {}
    if config.vision is not None:  # a multimodal checkpoint read with its vision tower (checkpoint/llama4_vision.py)
        out.update(llama4_vision.hf_to_meta(state_dict, source))
    for name, t in state_dict.items():
        if name.startswith(_HF_NON_TEXT):
            continue
        if name.startswith("language_model."):  # multimodal checkpoints nest the text model
            name = name[len("language_model."):]
        elif name.startswith("model.language_model."):  # transformers >= 5 layout of the same
            name = "model." + name[len("model.language_model."):]
        if name.startswith("model.layers.") and name.endswith("." + _GATE_UP):
            layer = name.split(".")[2]
            out[f"layers.{layer}.{_GATE}"], out[f"layers.{layer}.{_UP}"] = split_gate_up(t)
            continue
        meta = rename(name, HF_NAMES)
        if meta is None:
            raise CheckpointError(source, f"tensor {name!r} is not part of a Llama 4 text model (Llama4ForCausalLM)")
        out[meta] = t.t().contiguous() if meta.endswith(_ROUTER) else t  # nn.Linear (E, D) -> router (D, E)
    if config.tie_embeddings:
        out.pop("output.weight", None)
    return out


def normalize_meta(state_dict: Tensors, config: ModelConfig) -> Tensors:
    """Meta checkpoint spellings -> the canonical names and 3-D expert layouts (llama-models load hooks)."""
    D = config.dim
    out: Tensors = {}
    for name, t in state_dict.items():
        if name == "rope.freqs" or name.endswith("._extra_state"):
            continue  # precomputed frequencies / quantization bookkeeping: recomputed or unused
        if name.startswith(VISION_PREFIXES):
            if config.vision is not None:  # Meta's names are ours
                out[name] = t
            continue  # otherwise the text decoder is read alone
        prefix, _, leaf = name.rpartition(".")
        if prefix.endswith("feed_forward.experts") and config.moe is not None:
            E = config.moe.num_experts
            leaf = {"w1": "moe_w_in_eD_F", "w3": "moe_w_swiglu_eD_F", "w2": "moe_w_out_eF_D"}.get(leaf, leaf)
            # Meta stores experts either as (E, D, F) or flattened to (E*D, F) / (E*F, D).
            t = t.view(E, -1, D) if leaf == "moe_w_out_eF_D" else t.view(E, D, -1)
            out[f"{prefix}.{leaf}"] = t
            continue
        renames = {
            "feed_forward.w_in_shared_FD.weight": "feed_forward.shared_expert.w1.weight",
            "feed_forward.w_swiglu_FD.weight": "feed_forward.shared_expert.w3.weight",
            "feed_forward.w_out_shared_DF.weight": "feed_forward.shared_expert.w2.weight",
            "feed_forward.norm.weight": "ffn_norm.weight",
            "feed_forward.mlp.layer_norm_weight": "ffn_norm.weight",
            "attention.wqkv.layer_norm_weight": "attention_norm.weight",
        }
        for old, new in renames.items():
            if name.endswith(old):
                name = name[: -len(old)] + new
                break
        out[name] = t
    return out


# -- GGUF (llama.cpp arch "llama4") ---------------------------------------------------------------------------
# GGUF tensor name -> canonical name: gguf-py `constants.py` (MODEL_ARCH.LLAMA4) and `tensor_mapping.py`; shapes
# as llama.cpp `src/models/llama4.cpp::load_arch_tensors` creates them. q/k are Meta's (adjacent-pair rotary,
# llama.cpp's rope type NORM for llama4; convert_hf_to_gguf.py Llama4Model sets undo_permute = False).
GGUF_NAMES: dict[str, str] = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",  # absent when the embeddings are tied
    "blk.{i}.attn_norm.weight": "layers.{i}.attention_norm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.attention.wq.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.attention.wk.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.attention.wv.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attention.wo.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.ffn_norm.weight",
    # dense layers
    "blk.{i}.ffn_gate.weight": "layers.{i}.feed_forward.w1.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.feed_forward.w3.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.feed_forward.w2.weight",
    # MoE layers: router (ne {dim, E}), stacked experts (ne {dim, F, E}, down {F, dim, E}), shared expert
    "blk.{i}.ffn_gate_inp.weight": "layers.{i}.feed_forward.router_DE",
    "blk.{i}.ffn_gate_exps.weight": "layers.{i}.feed_forward.experts.moe_w_in_eD_F",
    "blk.{i}.ffn_up_exps.weight": "layers.{i}.feed_forward.experts.moe_w_swiglu_eD_F",
    "blk.{i}.ffn_down_exps.weight": "layers.{i}.feed_forward.experts.moe_w_out_eF_D",
    "blk.{i}.ffn_gate_shexp.weight": "layers.{i}.feed_forward.shared_expert.w1.weight",
    "blk.{i}.ffn_up_shexp.weight": "layers.{i}.feed_forward.shared_expert.w3.weight",
    "blk.{i}.ffn_down_shexp.weight": "layers.{i}.feed_forward.shared_expert.w2.weight",
}
# Meta's router (D, E) and experts (E, D, F) / (E, F, D) are the transposes of llama.cpp's row-major matrices
# (E, D), (E, F, D) / (E, D, F): convert_hf_to_gguf.py Llama4Model transposes HF's gate_up_proj and down_proj.
_GGUF_TRANSPOSED = (_ROUTER, _GATE, _UP, "feed_forward.experts.moe_w_out_eF_D")

# What llama.cpp's llama4 fixes instead of reading from the file (src/models/llama4.cpp load_arch_hparams, for
# files without `attention.sliding_window = 0`): chunks of 8192, temperature tuning with floor 8192 and scale 0.1,
# NoPE in every 4th layer (llama_hparams::n_no_rope_layer_step), QK-norm unless 128 experts (Maverick).
GGUF_CHUNK, GGUF_NOPE_INTERVAL, GGUF_FLOOR_SCALE, GGUF_ATTN_SCALE = 8192, 4, 8192.0, 0.1


def is_vision(canonical_name: str) -> bool:
    """A tensor of the vision tower (Meta's names), which GGUF's text file leaves to llama.cpp's mmproj file."""
    return canonical_name.startswith(VISION_PREFIXES)


def gguf_transposed(canonical_name: str) -> bool:
    """True for the tensors GGUF stores transposed (last two axes) relative to Meta's layout."""
    return canonical_name.endswith(_GGUF_TRANSPOSED)


def from_gguf(canonical_name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A GGUF tensor (already renamed to `canonical_name`) in Meta's layout: router and experts transposed."""
    return tensor.transpose(-1, -2).contiguous() if gguf_transposed(canonical_name) else tensor


to_gguf = from_gguf  # a transpose of the last two axes is its own inverse


def _gguf_qk_norm(num_experts: int) -> bool:
    return num_experts != 128  # llama.cpp: use_kq_norm = type != LLM_TYPE_17B_128E


def gguf_fields(get: Any, source: object = None) -> dict[str, Any]:
    """ModelConfig fields of a llama4 GGUF file; `get(key, kind, default)` reads `llama4.<key>` metadata."""
    experts = get("expert_count", int)
    moe = MoEConfig(num_experts=experts, top_k=get("expert_used_count", int),
                    hidden_dim=get("expert_feed_forward_length", int),
                    interleave_step=get("interleave_moe_layer_step", int))
    if not (0 < moe.top_k <= experts < 1 << 16 and 0 < moe.hidden_dim < 1 << 31 and 0 < moe.interleave_step < 1 << 16):
        raise GGUFError(source, f"llama4 expert metadata {moe} is not a usable mixture of experts (llama.cpp's llama4 "
                        "also needs experts, 0 < expert_used_count <= expert_count); fix the llama4.* keys")
    if get("attention.sliding_window", int, None) == 0:  # llama.cpp: no chunks, and RoPE in every layer
        return dict(moe=moe, attention_chunk_size=None, nope_layer_interval=None, use_qk_norm=_gguf_qk_norm(experts),
                    attn_temperature_tuning=False)
    return dict(moe=moe, attention_chunk_size=GGUF_CHUNK, nope_layer_interval=GGUF_NOPE_INTERVAL,
                use_qk_norm=_gguf_qk_norm(experts), attn_temperature_tuning=True, floor_scale=GGUF_FLOOR_SCALE,
                attn_scale=GGUF_ATTN_SCALE)


def check_gguf(config: ModelConfig, source: object = None) -> None:
    """Refuse, saying why, a Llama 4 that llama.cpp's llama4 architecture would run differently from us."""
    c = config

    def refuse(what: str) -> None:
        raise CheckpointError(source, f"GGUF cannot state this Llama 4's {what}; write --to hf (or --to meta) instead")

    if c.moe is None:
        refuse("dense-only layout: llama.cpp's llama4 needs experts (\"cannot have zero experts\")")
    if c.use_qk_norm != _gguf_qk_norm(c.moe.num_experts):
        refuse(f"use_qk_norm={c.use_qk_norm}: llama.cpp applies QK-norm exactly when there are not 128 experts")
    # Without chunks and NoPE layers a file would say `attention.sliding_window = 0`, but llama.cpp's llama4 then
    # aborts at its first decode (llama-graph.cpp: GGML_ASSERT(f_attn_temp_scale != 0.0f)), so that is refused too.
    if (c.attention_chunk_size, c.nope_layer_interval) != (GGUF_CHUNK, GGUF_NOPE_INTERVAL):
        refuse(f"chunk size {c.attention_chunk_size} / NoPE interval {c.nope_layer_interval}: llama.cpp fixes them "
               f"at {GGUF_CHUNK} / {GGUF_NOPE_INTERVAL}")
    if (c.attn_temperature_tuning, c.floor_scale, c.attn_scale) != (True, GGUF_FLOOR_SCALE, GGUF_ATTN_SCALE):
        refuse(f"NoPE temperature tuning ({c.attn_temperature_tuning}, floor {c.floor_scale}, scale {c.attn_scale}): "
               f"llama.cpp fixes it on, floor {GGUF_FLOOR_SCALE:g}, scale {GGUF_ATTN_SCALE}")


# -- configurations ------------------------------------------------------------------------------------------
def config_from_params(params: dict[str, Any], *, source: str = "params.json") -> ModelConfig:
    """A Meta Llama 4 params.json -> ModelConfig (fields as llama-models `llama4/args.py::ModelArgs`)."""
    try:
        dim, multiple_of = params["dim"], params.get("multiple_of", 256)
        mult = params.get("ffn_dim_multiplier")
        moe = None
        if params.get("moe_args"):
            ma = params["moe_args"]
            moe = MoEConfig(
                num_experts=ma["num_experts"],
                top_k=ma.get("top_k", 1),
                interleave_step=ma.get("interleave_moe_layer_step", 1),
                hidden_dim=moe_hidden_dim(dim, params["ffn_exp"], multiple_of, mult,
                                          ma.get("capacity_factor", 1.0), ma.get("auto_scale_F", True)),
            )
        scaling = None
        if params.get("use_scaled_rope"):
            # llama-models llama4/args.py: only Scout scales, with factor 16 and high_freq_factor 1 when unstated;
            # llama4/model.py::apply_scaling fixes low_freq_factor 1 and the original context 8192.
            scaling = RopeScaling(kind="llama3", factor=params.get("rope_scaling_factor") or 16.0,
                                  low_freq_factor=1.0, high_freq_factor=params.get("rope_high_freq_factor") or 1.0,
                                  original_max_position=8192)
        return ModelConfig(
            arch="llama4", dim=dim, n_layers=params["n_layers"], n_heads=params["n_heads"],
            n_kv_heads=params.get("n_kv_heads"), vocab_size=params["vocab_size"],
            hidden_dim=ffn_hidden_dim(dim, multiple_of, mult), multiple_of=multiple_of, ffn_dim_multiplier=mult,
            norm_eps=params.get("norm_eps", 1e-5), rope_theta=params.get("rope_theta", 500000.0),
            rope_scaling=scaling, max_seq_len=params.get("max_seq_len", _released_context(params)), moe=moe,
            attention_chunk_size=params.get("attention_chunk_size"),
            nope_layer_interval=params.get("nope_layer_interval"), use_qk_norm=params.get("use_qk_norm", False),
            attn_temperature_tuning=bool(params.get("attn_temperature_tuning", False)),
            floor_scale=float(params.get("floor_scale", 8192.0)), attn_scale=params.get("attn_scale", 0.1),
            vision=llama4_vision.config_from_params(params["vision_args"], source=source)
            if params.get("vision_args") else None,
        )
    except KeyError as exc:
        raise CheckpointError(source, f"Llama 4 params.json lacks field {exc.args[0]!r}; add it from the release") from None


def params_from_config(config: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> a Meta Llama 4 params.json dict that llama-models' ModelArgs reads back into the same widths.

    Meta's file states no widths, only the rules' inputs (llama4/model.py dense FeedForward, llama4/moe.py MoE):
    multiple_of, ffn_dim_multiplier and ffn_exp are chosen so both rules give back hidden_dim and moe.hidden_dim.
    """
    c = config
    if c.arch != "llama4" or c.moe is None:
        raise CheckpointError(None, f"a Llama 4 params.json needs arch 'llama4' with moe set, not {c.arch!r}")
    if c.head_dim * c.n_heads != c.dim:
        raise CheckpointError(None, f"Meta's format derives head_dim = dim / n_heads; head_dim {c.head_dim} differs")
    multiple_of, mult, ffn_exp, auto_scale = _width_params(c)
    params: dict[str, Any] = {
        "dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
        "vocab_size": c.vocab_size, "multiple_of": multiple_of, "ffn_dim_multiplier": mult, "ffn_exp": ffn_exp,
        "norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "use_scaled_rope": c.rope_scaling is not None,
        "attention_chunk_size": c.attention_chunk_size, "nope_layer_interval": c.nope_layer_interval,
        "use_qk_norm": c.use_qk_norm, "attn_temperature_tuning": c.attn_temperature_tuning,
        "floor_scale": c.floor_scale, "attn_scale": c.attn_scale, "max_seq_len": c.max_seq_len,
        "moe_args": {"num_experts": c.moe.num_experts, "capacity_factor": 1.0, "auto_scale_F": auto_scale,
                     "top_k": c.moe.top_k, "interleave_moe_layer_step": c.moe.interleave_step},
    }
    s = c.rope_scaling
    if s is not None:
        # llama4/model.py::apply_scaling fixes low_freq_factor 1 and the original context 8192.
        if (s.kind, s.low_freq_factor, s.original_max_position) != ("llama3", 1.0, 8192):
            raise CheckpointError(None, f"Meta's Llama 4 format can only express Scout-style rope scaling, not {s}")
        params.update(rope_scaling_factor=s.factor, rope_high_freq_factor=s.high_freq_factor)
    return params


def _width_params(c: ModelConfig) -> tuple[int, float | None, float, bool]:
    """(multiple_of, ffn_dim_multiplier, ffn_exp, auto_scale_F) reproducing c.hidden_dim and c.moe.hidden_dim."""
    H, F = c.hidden_dim, c.moe.hidden_dim
    base = int(2 * (4 * c.dim) / 3)
    # The config's own inputs first (read from params.json, they hold); else a common multiple of both widths
    # and the multiplier that scales the dense rule's base onto H (a config read from config.json).
    m = math.gcd(H, F)
    for multiple_of, mult in ((c.multiple_of, c.ffn_dim_multiplier), (m, H / base if H != base else None)):
        if ffn_hidden_dim(c.dim, multiple_of, mult) != H:
            continue
        for auto_scale in (True, False):
            # Released files say ffn_exp 4.0; otherwise any x / dim with x = int(ffn_exp * dim) will do.
            for x in (4 * c.dim, *range(1, 16 * c.dim + 1)):
                if moe_hidden_dim(c.dim, x / c.dim, multiple_of, mult, 1.0, auto_scale) == F:
                    return multiple_of, mult, x / c.dim, auto_scale
    raise CheckpointError(
        None, f"no multiple_of / ffn_dim_multiplier / ffn_exp of Meta's width rules gives dense width {H} and "
        f"expert width {F}; Meta's format cannot describe this model, write --to hf instead",
    )


def _released_context(params: dict[str, Any]) -> int:
    """params.json states no context length; the releases' config.json max_position_embeddings do:
    10M for Scout (the only one with use_scaled_rope, llama-models llama4/args.py), 1M for Maverick."""
    return 10485760 if params.get("use_scaled_rope") else 1048576


def config_from_hf(cfg: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
    """A Llama4ForCausalLM / Llama4ForConditionalGeneration config.json -> ModelConfig."""
    c = cfg.get("text_config", cfg)
    try:
        n_layers = c["num_hidden_layers"]
        nope = _interval(c.get("no_rope_layers"), n_layers, want=0, field="no_rope_layers", source=source)
        if nope is None and not c.get("no_rope_layers"):
            nope = c.get("no_rope_layer_interval", 4)  # HF default when the list is absent
        moe_layers = c.get("moe_layers")
        step = c.get("interleave_moe_layer_step", 1)
        if moe_layers is not None:
            step = _interval([int(i in moe_layers) for i in range(n_layers)], n_layers, want=1,
                             field="moe_layers", source=source) or step
        # A dense Llama 4 (Llama Guard 4): transformers' convert_llama4_weights_to_hf.py writes it with
        # num_local_experts 0, interleave_moe_layer_step 0 and moe_layers [].
        dense = c.get("num_local_experts") == 0 or moe_layers == [] or step == 0
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        theta = rope.get("rope_theta", c.get("rope_theta", 500000.0))
        scaling = None
        if rope.get("rope_type", rope.get("type", "default")) == "llama3":
            scaling = RopeScaling(kind="llama3", factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
                                  high_freq_factor=rope["high_freq_factor"],
                                  original_max_position=rope["original_max_position_embeddings"])
        elif rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise CheckpointError(source, f"rope type {rope.get('rope_type')!r} is not one Llama 4 uses")
        return ModelConfig(
            arch="llama4", dim=c["hidden_size"], n_layers=n_layers, n_heads=c["num_attention_heads"],
            n_kv_heads=c.get("num_key_value_heads"), head_dim=c.get("head_dim"), vocab_size=c["vocab_size"],
            hidden_dim=c["intermediate_size_mlp"], norm_eps=c.get("rms_norm_eps", 1e-5), rope_theta=theta,
            rope_scaling=scaling, max_seq_len=c.get("max_position_embeddings", 2048),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            moe=None if dense else MoEConfig(num_experts=c["num_local_experts"], top_k=c.get("num_experts_per_tok", 1),
                                             hidden_dim=c["intermediate_size"], interleave_step=step),
            attention_chunk_size=c.get("attention_chunk_size"), nope_layer_interval=nope,
            use_qk_norm=bool(c.get("use_qk_norm", True)),
            attn_temperature_tuning=bool(c.get("attn_temperature_tuning", True)),
            floor_scale=float(c.get("floor_scale", 8192)), attn_scale=c.get("attn_scale", 0.1),
            vision=llama4_vision.config_from_hf(cfg["vision_config"], source=source)
            if cfg.get("model_type") == "llama4" and cfg.get("vision_config") else None,
        )
    except KeyError as exc:
        raise CheckpointError(source, f"Llama 4 config.json lacks field {exc.args[0]!r}") from None


def _interval(flags: list[int] | None, n_layers: int, *, want: int, field: str, source: str) -> int | None:
    """The n such that flags[i] == want exactly when (i + 1) % n == 0; None when no layer has `want`."""
    if not flags:
        return None
    hits = [i for i, f in enumerate(flags[:n_layers]) if int(f) == want]
    if not hits:
        return None
    n = hits[0] + 1
    if hits != list(range(n - 1, n_layers, n)):
        raise ConfigError(f"{source}: {field} {flags} is not periodic; llamaherd supports every-n-th-layer patterns")
    return n


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> keyword arguments of transformers' Llama4TextConfig (and a text-only config.json)."""
    if config.arch != "llama4":
        raise ConfigError(f"config_to_hf needs a Llama 4 config, got arch {config.arch!r}")
    moe = config.moe
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        s = config.rope_scaling
        rope.update(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                    high_freq_factor=s.high_freq_factor, original_max_position_embeddings=s.original_max_position)
    n = config.n_layers
    nope = config.nope_layer_interval
    return dict(
        vocab_size=config.vocab_size, hidden_size=config.dim,
        intermediate_size=moe.hidden_dim if moe else config.hidden_dim,
        intermediate_size_mlp=config.hidden_dim, num_hidden_layers=n, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim, hidden_act="silu",
        max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings, num_experts_per_tok=moe.top_k if moe else 1,
        num_local_experts=moe.num_experts if moe else 0,  # dense: as transformers' converter writes Llama Guard 4
        moe_layers=[i for i in range(n) if moe and moe.is_moe_layer(i)],
        interleave_moe_layer_step=moe.interleave_step if moe else 0, use_qk_norm=config.use_qk_norm,
        no_rope_layers=[int(nope is None or (i + 1) % nope != 0) for i in range(n)],
        layer_types=["chunked_attention" if config.attention_chunk_size and (nope is None or (i + 1) % nope)
                     else "full_attention" for i in range(n)],
        attention_chunk_size=config.attention_chunk_size, attn_temperature_tuning=config.attn_temperature_tuning,
        floor_scale=int(config.floor_scale) if float(config.floor_scale).is_integer() else config.floor_scale,
        attn_scale=config.attn_scale, rope_parameters=rope,
    )
