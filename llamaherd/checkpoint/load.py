"""Detect a checkpoint's format and load it: a Meta folder, a Hugging Face folder, a GGUF file, or a store name."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from ..errors import CheckpointError, ModelNotFoundError
from .base import Checkpoint, materialize

# format -> "module:function" taking a Path and returning a Checkpoint; imported on demand.
READERS: dict[str, str] = {
    "meta": "llamaherd.checkpoint.meta_pth:read",
    "hf": "llamaherd.checkpoint.hf:read",
    "gguf": "llamaherd.checkpoint.gguf:read",
}


def detect_format(path: Path) -> str:
    """Name the format of `path` from what it contains, never from its name alone."""
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise CheckpointError(path, "not a GGUF file (bad magic); give a GGUF file or a checkpoint folder")
    if path.is_dir():
        if (path / "params.json").exists() or any(path.glob("consolidated.*.pth")):
            return "meta"
        if (path / "config.json").exists() or any(path.glob("*.safetensors")):
            return "hf"
        raise CheckpointError(
            path, "folder holds neither params.json + consolidated.*.pth (Meta) nor config.json + *.safetensors (HF)"
        )
    raise ModelNotFoundError(f"{path}: no such file or folder")


def read(path: str | Path) -> Checkpoint:
    path = Path(path).expanduser()
    fmt = detect_format(path)
    module, fn = READERS[fmt].split(":")
    return getattr(importlib.import_module(module), fn)(path)


def resolve(source: str | Path) -> Path:
    """A path as given, or a model name looked up in the local store."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    try:
        from ..store import resolve_name
    except ImportError:
        raise ModelNotFoundError(f"{source}: no such file or folder") from None
    return resolve_name(str(source))


def load(source: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None):
    """Load a model from a Meta folder, a Hugging Face folder, a .gguf file, or a name in the local store."""
    from ..api import Model

    ckpt = read(resolve(source))
    net = materialize(ckpt, dtype=dtype, device=device)
    return Model(net, ckpt)
