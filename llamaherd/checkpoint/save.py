"""Write a Checkpoint in any supported format, dispatching through one table of writers."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..atomic import replacing_folder
from ..errors import CheckpointError
from . import gguf_write, hf, meta_pth
from .base import Checkpoint, dequantized

# format -> write(ckpt: Checkpoint, dst: Path, **options) -> Path.
WRITERS = {"meta": meta_pth.write, "hf": hf.write, "gguf": gguf_write.write}

DTYPES: dict[str, torch.dtype] = {
    "f32": torch.float32, "float32": torch.float32,
    "f16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise CheckpointError(None, f"unknown dtype {name!r}; known: {', '.join(DTYPES)}") from None


def cast(ckpt: Checkpoint, dtype: torch.dtype) -> Checkpoint:
    """A copy of `ckpt` whose floating-point tensors have `dtype` (others untouched)."""
    sd = {k: t.to(dtype) if t.is_floating_point() else t for k, t in ckpt.state_dict.items()}
    return dataclasses.replace(ckpt, state_dict=sd)


def save(
    ckpt: Checkpoint, dst: str | Path, fmt: str, *, dtype: str | torch.dtype | None = None, **options: Any
) -> Path:
    """Write `ckpt` to `dst` as `fmt` ("meta", "hf", "gguf"); `dtype` casts float tensors first (meta/hf)."""
    try:
        writer = WRITERS[fmt]
    except KeyError:
        raise CheckpointError(dst, f"unknown output format {fmt!r}; known: {', '.join(WRITERS)}") from None
    check_complete(ckpt)
    if fmt != "gguf":  # float formats: quantized (GGUF) weights are decoded first; the GGUF writer does it per tensor
        ckpt = dequantized(ckpt, f"{fmt} output")
    torch_dtype = parse_dtype(dtype)
    if torch_dtype is not None and fmt != "gguf":
        ckpt = cast(ckpt, torch_dtype)
    elif dtype is not None:
        options["dtype"] = dtype  # GGUF's writer picks its own tensor types
    if fmt == "gguf":  # one file, which the GGUF writer itself writes atomically
        return writer(ckpt, Path(dst), **options)
    with replacing_folder(dst, carry=_not_weights) as stage:  # a killed convert leaves the old folder or the new
        writer(ckpt, stage, **options)
    return Path(dst)


def check_complete(ckpt: Checkpoint) -> None:
    """Refuse a checkpoint whose projections are built as packed modules when loaded (GPTQ, AWQ, llamaherd's
    weight-only folders, Meta's int4 releases): its state dict lacks them, and a writer would drop them."""
    from ..model import build

    absent = sorted(set(build(ckpt.config, device="meta").state_dict()) - set(ckpt.state_dict))
    if absent:
        kind = ckpt.metadata.get("quantization") or "packed"
        raise CheckpointError(ckpt.source, f"its projections are {kind} codes, not float tensors ({len(absent)} "
                              f"tensors, e.g. {absent[0]}); convert and quantize write float or GGUF checkpoints "
                              "from float weights: run this one as it is with llamaherd.load / herd run, or start "
                              "from the unquantized release")


def _not_weights(name: str) -> bool:
    """Files of an existing output folder worth keeping: not weights, their index or the config they replace."""
    return not (name.endswith((".safetensors", ".pth", ".safetensors.index.json", ".gguf"))
                or name in ("config.json", "params.json", "generation_config.json"))
