"""Hugging Face checkpoints, both ways: config.json + safetensors, names and configs from each family's module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import GenerationDefaults
from ..errors import CheckpointError
from ..quant import fp8, hf_quantized
from . import gemma3, llama, llama4, mllama
from .base import Checkpoint, attach_tokenizer
from .pth import load_pth

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")
# arch -> the module with its HF names (HF_NAMES), configs (config_from_hf, config_to_hf), state-dict
# conversion (hf_to_meta, meta_to_hf) and the model_type / class it reads and writes.
FAMILIES = {"llama": llama, "llama4": llama4, "gemma3": gemma3, "mllama": mllama}
# config.json model_type -> family; the multimodal types ("llama4", "gemma3") are read for their text decoder.
HF_MODEL_TYPES = {model_type: f for f in FAMILIES.values() for model_type in f.MODEL_TYPES}
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # transformers' save_pretrained default ("5GB")

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


# -- config.json <-> ModelConfig -----------------------------------------------------------------


def _json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(file, f"is not valid JSON ({exc}); restore it from the original checkpoint") from None


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


# The one quantization_config this reader lets through: llamaherd's own weight-only folders (checkpoint/quantized.py).
QUANT_METHOD = "llamaherd"


def check_method(qc: Any, cfile: Path) -> None:
    """Refuse a quantization_config this version cannot run (GPTQ, AWQ, FP8 ...), naming it."""
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method != QUANT_METHOD and not fp8.reads(qc) and not hf_quantized.reads(qc):  # FP8: dequantised by `read`
        raise CheckpointError(cfile, f"quantization_config.quant_method {method!r} is not one llamaherd reads "
                              f"(it reads {QUANT_METHOD!r}: folders saved by llamaherd.checkpoint.quantized.save, "
                              f"GPTQ and AWQ, and the 8-bit weights of {', '.join(fp8.METHODS)}); "
                              "dequantise the checkpoint to bf16 with its own tools, or download the unquantized model")


def read(path: str | Path) -> Checkpoint:
    """Read an HF Llama folder into Meta names, un-permuting wq/wk back to Meta's interleaved RoPE layout."""
    path = Path(path)
    cfile = path / "config.json"
    if not cfile.exists():
        raise CheckpointError(path, "config.json is missing; a Hugging Face folder needs it beside the safetensors")
    cfg = _json(cfile)
    if not isinstance(cfg, dict):
        raise CheckpointError(cfile, "must hold a JSON object")
    model_type = cfg.get("model_type", "llama")  # old Llama configs state none
    family = HF_MODEL_TYPES.get(model_type)
    if family is None:
        raise CheckpointError(cfile, f"model_type {model_type!r} is not one llamaherd reads; known: "
                              f"{', '.join(HF_MODEL_TYPES)}")
    config = family.config_from_hf(cfg, source=cfile)
    qc = cfg.get("quantization_config")
    if qc is not None:  # refuse foreign formats before reading their packed tensors as float ones
        check_method(qc, cfile)
    raw = _load_weights(path)
    fp8_codes = {}
    if qc is not None and fp8.reads(qc):
        fp8_codes = fp8.kept_codes(raw, qc)  # memory-mapped: what `quantized.keep_fp8` runs as stored on request
        try:
            raw = fp8.dequantize(raw, qc)
        except fp8.FP8Error as exc:
            raise CheckpointError(path, f"{fp8.describe(qc)}: {exc}; the checkpoint is incomplete or corrupt: "
                                  "download it again") from None
    packed = {}
    if qc is not None and hf_quantized.reads(qc):  # GPTQ / AWQ codes: built into modules by `quantized.read`
        raw, packed = hf_quantized.split(raw)
    sd = family.hf_to_meta(raw, config, source=path)
    ckpt = Checkpoint(
        config=config, state_dict=sd, source=path, tokenizer=attach_tokenizer(path, ("tokenizer.json", "tokenizer.model")),
        generation=generation_from_hf(path, cfg), chat_template=chat_template_from_hf(path),
        metadata={"format": "hf", "config": cfg, **({"packed": packed} if packed else {}),
                  **({"fp8_codes": fp8_codes} if fp8_codes else {})},
    )
    return ckpt  # a llamaherd-quantized folder's codes are attached by `quantized.read`, the reader of this format


# -- writing -------------------------------------------------------------------------------------


def _family(ckpt: Checkpoint):
    try:
        return FAMILIES[ckpt.config.arch]
    except KeyError:
        raise CheckpointError(ckpt.source, f"Hugging Face output supports arch {', '.join(map(repr, FAMILIES))}, "
                              f"not {ckpt.config.arch!r}") from None


def _hf_state_dict(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    sd = _family(ckpt).meta_to_hf(ckpt.state_dict, ckpt.config, source=ckpt.source)
    return {k: t.contiguous() for k, t in sd.items()}


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


def write(ckpt: Checkpoint, dst: str | Path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
          extra: dict[str, torch.Tensor] | None = None, **_: Any) -> Path:
    """Write config.json, model.safetensors (or shards + index), generation_config.json and tokenizer files.

    `extra` holds tensors already under Hugging Face names, written beside the model's (a quantized format's scales).
    """
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    sd = {**_hf_state_dict(ckpt), **(extra or {})}
    dtype = next((t.dtype for t in sd.values() if t.is_floating_point() and t.element_size() > 1), torch.float32)
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
    family = _family(ckpt)
    cfg = {"architectures": [family.HF_CLASS], "model_type": family.HF_MODEL_TYPE, **family.config_to_hf(ckpt.config),
           "torch_dtype": _DTYPE_NAMES.get(dtype, "float32")}
    gen = ckpt.generation
    if gen.bos_token_id is not None:
        cfg["bos_token_id"] = gen.bos_token_id
    if gen.eos_token_ids:
        cfg["eos_token_id"] = gen.eos_token_ids[0] if len(gen.eos_token_ids) == 1 else list(gen.eos_token_ids)
    return cfg


def _copy_tokenizer(ckpt: Checkpoint, dst: Path) -> None:
    src = ckpt.source
    if src.is_dir():  # a single-file source (GGUF) has no tokenizer files beside it
        for name in TOKENIZER_FILES:
            if (src / name).exists() and not (dst / name).exists():
                shutil.copyfile(src / name, dst / name)
    if ckpt.chat_template and chat_template_from_hf(dst) is None:
        (dst / "chat_template.jinja").write_text(ckpt.chat_template)
