"""Detect a checkpoint's format from what it contains and read it: a Meta folder, a Hugging Face folder, a GGUF file."""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError, ModelNotFoundError
from . import gguf, hf, meta_pth
from .base import Checkpoint

# format -> reader taking a Path and returning a Checkpoint.
READERS = {"meta": meta_pth.read, "hf": hf.read, "gguf": gguf.read}


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
    """The checkpoint at `path`, read by the reader of its format."""
    path = Path(path).expanduser()
    return READERS[detect_format(path)](path)
