"""Hugging Face checkpoints, both ways: config.json + safetensors; Llama here, Llama 4 / Gemma 3 via name modules."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import ConfigError, GenerationDefaults, ModelConfig, RopeScaling
from ..errors import CheckpointError
from .base import Checkpoint, attach_tokenizer
from .meta_pth import load_pth
from .names import HF_IGNORED, hf_to_meta, is_rope_projection, meta_to_hf
from .transforms import permute_to_hf, unpermute_from_hf

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")
# Families whose names, layouts and config.json live in their own module (config_from_hf, hf_to_meta,
# meta_to_hf, config_to_hf): arch -> (module, class and model_type written). Llama 1-3 stay in this file.
HF_FAMILIES = {
    "llama4": ("llama4_names", "Llama4ForCausalLM", "llama4_text"),
    "gemma3": ("gemma3_names", "Gemma3ForCausalLM", "gemma3_text"),
}
# config.json model_type -> arch: the multimodal types ("llama4", "gemma3") are read for their text decoder.
HF_MODEL_TYPES = {"llama4": "llama4", "llama4_text": "llama4", "gemma3": "gemma3", "gemma3_text": "gemma3"}
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # transformers' save_pretrained default ("5GB")

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


# -- config.json <-> ModelConfig -----------------------------------------------------------------


def _json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(file, f"is not valid JSON ({exc}); restore it from the original checkpoint") from None


def _rope_scaling(cfg: dict[str, Any], file: Path) -> tuple[float, RopeScaling | None]:
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
    raise CheckpointError(file, f"rope type {kind!r} is not supported; known: 'default', 'linear', 'llama3'")


def config_from_hf(cfg: dict[str, Any], file: Path) -> ModelConfig:
    """ModelConfig from a LlamaForCausalLM config.json dict."""
    if cfg.get("model_type", "llama") != "llama":
        raise CheckpointError(file, f"model_type {cfg.get('model_type')!r} is not 'llama'; this reader handles Llama")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if key not in cfg:
            raise CheckpointError(file, f"lacks {key!r}, which every LlamaForCausalLM config.json states")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise CheckpointError(file, f"{key} is true; Llama models have no biases and this reader loads none")
    try:
        theta, scaling = _rope_scaling(cfg, file)
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
        raise CheckpointError(file, f"is inconsistent: {exc}") from None


def hf_config(c: ModelConfig, gen: GenerationDefaults, dtype: torch.dtype) -> dict[str, Any]:
    """A config.json that transformers 4.45+ and 5 read as LlamaForCausalLM (legacy rope_scaling spelling)."""
    if c.arch != "llama":
        raise CheckpointError(None, f"Hugging Face Llama output supports arch 'llama', not {c.arch!r}")
    s = c.rope_scaling
    scaling = None
    if s is not None and s.kind == "linear":
        scaling = {"rope_type": "linear", "factor": s.factor}
    elif s is not None:
        scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                   "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_position}
    out = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": c.dim, "intermediate_size": c.hidden_dim, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
        "vocab_size": c.vocab_size, "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta, "rope_scaling": scaling, "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": False, "mlp_bias": False, "torch_dtype": _DTYPE_NAMES.get(dtype, "float32"),
    }
    if gen.bos_token_id is not None:
        out["bos_token_id"] = gen.bos_token_id
    if gen.eos_token_ids:
        out["eos_token_id"] = gen.eos_token_ids[0] if len(gen.eos_token_ids) == 1 else list(gen.eos_token_ids)
    return out


def generation_from_hf(path: Path, cfg: dict[str, Any]) -> GenerationDefaults:
    """generation_config.json (falling back to config.json's token ids); eos_token_id may be an int or a list."""
    file = path / "generation_config.json"
    gen = _json(file) if file.exists() else {}
    eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
    bos = gen.get("bos_token_id", cfg.get("bos_token_id"))
    return GenerationDefaults(
        temperature=gen.get("temperature"), top_p=gen.get("top_p"), top_k=gen.get("top_k"),
        eos_token_ids=eos_ids, bos_token_id=None if bos is None else int(bos),
    )


# -- reading -------------------------------------------------------------------------------------


def _weight_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files and, when an index names them, its weight_map (tensor name -> file name)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.exists():
            data = _json(index)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict):
                raise CheckpointError(index, "has no 'weight_map' object; regenerate it or remove it")
            files = sorted({path / f for f in weight_map.values()})
            for f in files:
                if not f.exists():
                    raise CheckpointError(f, f"is listed in {index_name} but missing; download the missing shard")
            return files, weight_map
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(path, "no *.safetensors weights next to config.json; the folder is incomplete")
    return files, None


def load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """All tensors of one .safetensors file, memory-mapped (no copy until used)."""
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(
            file, f"is not a readable safetensors file ({exc}); it is truncated, corrupt or another format: "
            "download it again",
        ) from None


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    files, weight_map = _weight_files(path)
    raw: dict[str, torch.Tensor] = {}
    for f in files:
        tensors = load_safetensors(f) if f.suffix == ".safetensors" else load_pth(f)
        for name, t in tensors.items():
            if name in raw:
                raise CheckpointError(f, f"tensor {name} appears in two weight files; remove the duplicate file")
            if weight_map is not None and weight_map.get(name) != f.name:
                raise CheckpointError(
                    f, f"holds {name}, which the index assigns to {weight_map.get(name)}; the index is stale"
                )
            raw[name] = t
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(raw))
        if absent:
            raise CheckpointError(path, f"the index lists tensors no file holds: {absent[:4]}; re-download the shards")
    return raw


def chat_template_from_hf(path: Path) -> str | None:
    """chat_template.jinja (transformers >= 4.43 saves it apart) or tokenizer_config.json's chat_template."""
    if (path / "chat_template.jinja").exists():
        return (path / "chat_template.jinja").read_text()
    tc = path / "tokenizer_config.json"
    if not tc.exists():
        return None
    template = _json(tc).get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def read(path: str | Path) -> Checkpoint:
    """Read an HF Llama folder into Meta names, un-permuting wq/wk back to Meta's interleaved RoPE layout."""
    path = Path(path)
    cfile = path / "config.json"
    if not cfile.exists():
        raise CheckpointError(path, "config.json is missing; a Hugging Face folder needs it beside the safetensors")
    cfg = _json(cfile)
    if not isinstance(cfg, dict):
        raise CheckpointError(cfile, "must hold a JSON object")
    arch = HF_MODEL_TYPES.get(cfg.get("model_type"))
    if arch is not None:
        names = _family(arch)
        config = names.config_from_hf(cfg, source=str(cfile))
        sd = names.hf_to_meta(_load_weights(path), config)
    else:
        config, sd = _llama_from_hf(cfg, cfile, path)
    return Checkpoint(
        config=config, state_dict=sd, source=path, tokenizer=attach_tokenizer(path, ("tokenizer.json", "tokenizer.model")),
        generation=generation_from_hf(path, cfg), chat_template=chat_template_from_hf(path),
        metadata={"format": "hf", "config": cfg},
    )


def _llama_from_hf(cfg: dict[str, Any], cfile: Path, path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    config = config_from_hf(cfg, cfile)
    sd: dict[str, torch.Tensor] = {}
    for name, t in _load_weights(path).items():
        if HF_IGNORED.fullmatch(name):
            continue
        meta = hf_to_meta(name, path)
        which = is_rope_projection(meta)
        if which is not None:
            heads = config.n_heads if which == "q" else config.n_kv_heads
            if t.dim() != 2 or t.shape[0] != heads * config.head_dim:
                raise CheckpointError(
                    path, f"tensor {name} has shape {tuple(t.shape)}, config.json implies "
                    f"({heads * config.head_dim}, {config.dim}); the weights do not belong to this config.json",
                )
            t = unpermute_from_hf(t, heads)
        sd[meta] = t
    if config.tie_embeddings:
        out = sd.pop("output.weight", None)  # some tied checkpoints still save lm_head: it must be the embedding
        if out is not None and not torch.equal(out, sd.get("tok_embeddings.weight", out.new_empty(0))):
            raise CheckpointError(path, "tie_word_embeddings is true but lm_head.weight differs from embed_tokens")
    return config, sd


# -- writing -------------------------------------------------------------------------------------


def _hf_state_dict(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    c = ckpt.config
    if c.arch in HF_FAMILIES:
        return {k: t.contiguous() for k, t in _family(c.arch).meta_to_hf(ckpt.state_dict, c).items()}
    out: dict[str, torch.Tensor] = {}
    for name, t in ckpt.state_dict.items():
        if name == "output.weight" and c.tie_embeddings:
            continue
        which = is_rope_projection(name)
        if which is not None:
            t = permute_to_hf(t, c.n_heads if which == "q" else c.n_kv_heads)
        out[meta_to_hf(name, ckpt.source)] = t.contiguous()
    return out


def _shard(sd: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def write(ckpt: Checkpoint, dst: str | Path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, **_: Any) -> Path:
    """Write config.json, model.safetensors (or shards + index), generation_config.json and tokenizer files."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    sd = _hf_state_dict(ckpt)
    dtype = next((t.dtype for t in sd.values() if t.is_floating_point()), torch.float32)
    shards = _shard(sd, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], dst / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, part in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(part, dst / fname, metadata={"format": "pt"})
            weight_map.update({name: fname for name in part})
        total = sum(t.numel() * t.element_size() for t in sd.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (dst / "config.json").write_text(json.dumps(_config_json(ckpt, dtype), indent=2) + "\n")
    gen = ckpt.generation
    fields = (("temperature", gen.temperature), ("top_p", gen.top_p), ("top_k", gen.top_k),
              ("bos_token_id", gen.bos_token_id))
    gcfg: dict[str, Any] = {k: v for k, v in fields if v is not None}
    if gen.eos_token_ids:
        gcfg["eos_token_id"] = gen.eos_token_ids[0] if len(gen.eos_token_ids) == 1 else list(gen.eos_token_ids)
    (dst / "generation_config.json").write_text(json.dumps(gcfg, indent=2) + "\n")
    _copy_tokenizer(ckpt, dst)
    return dst


def _config_json(ckpt: Checkpoint, dtype: torch.dtype) -> dict[str, Any]:
    arch = ckpt.config.arch
    if arch not in HF_FAMILIES:
        return hf_config(ckpt.config, ckpt.generation, dtype)
    _, cls, model_type = HF_FAMILIES[arch]
    cfg = _family(arch).config_to_hf(ckpt.config)
    cfg.update(architectures=[cls], model_type=model_type, torch_dtype=_DTYPE_NAMES.get(dtype))
    return cfg


def _family(arch: str):
    """The module holding `arch`'s Hugging Face names and config (imported on first use)."""
    return importlib.import_module(f".{HF_FAMILIES[arch][0]}", __package__)


def _copy_tokenizer(ckpt: Checkpoint, dst: Path) -> None:
    src = ckpt.source
    if src.is_dir():  # a single-file source (GGUF) has no tokenizer files beside it
        for name in TOKENIZER_FILES:
            if (src / name).exists() and not (dst / name).exists():
                shutil.copyfile(src / name, dst / name)
    if ckpt.chat_template and chat_template_from_hf(dst) is None:
        (dst / "chat_template.jinja").write_text(ckpt.chat_template)
