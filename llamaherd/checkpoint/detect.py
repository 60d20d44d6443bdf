"""Detect a checkpoint's format from what it contains and read it: a Meta folder, a Hugging Face folder, a GGUF file."""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError, ModelNotFoundError
from . import gguf, meta_pth, quantized
from .base import Checkpoint

# format -> reader taking a Path and returning a Checkpoint.
# A Hugging Face folder is read by `quantized.read`: hf.read, plus llamaherd's weight-only codes where present.
READERS = {"meta": meta_pth.read, "hf": quantized.read, "gguf": gguf.read}


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


# The widths a model is built from: each must be a positive int below this bound (found by bench/fuzz_loaders.py:
# a config.json field of the wrong type otherwise surfaced as a ZeroDivisionError or a torch error at build time).
_WIDTHS = ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "vocab_size", "max_seq_len")
_MAX_WIDTH = 1 << 24


def read(path: str | Path) -> Checkpoint:
    """The checkpoint at `path`, read by the reader of its format; malformed metadata is a CheckpointError."""
    path = Path(path).expanduser()
    fmt = detect_format(path)
    try:
        ckpt = READERS[fmt](path)
    except (TypeError, ValueError, AttributeError, KeyError, ZeroDivisionError, OverflowError) as exc:
        raise CheckpointError(path, f"its {fmt} metadata has a field of the wrong type or value "
                              f"({type(exc).__name__}: {exc}); fix the config file or download it again") from None
    c = ckpt.config
    for name in _WIDTHS:
        v = getattr(c, name, None)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 < v < _MAX_WIDTH:
            raise CheckpointError(path, f"its {fmt} config gives {name} = {v!r}; it must be a positive whole number "
                                  f"below {_MAX_WIDTH}: fix the config file or download it again")
    return ckpt
