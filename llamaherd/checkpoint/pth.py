"""Meta's weight files: consolidated.NN.pth shards listed in order and loaded as tensors only (weights_only)."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from ..errors import CheckpointError

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")  # what a Meta folder holds beside its weights


def load_pth(file: Path) -> dict[str, torch.Tensor]:
    """One .pth file, memory-mapped, with pickled code refused (weights_only)."""
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            file, f"refused to unpickle: the file holds objects other than tensors ({str(exc).splitlines()[0]}); "
            "only plain tensor state dicts are loaded, never code; get the checkpoint from a trusted source",
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            file, f"cannot read as a PyTorch checkpoint ({reason}); "
            "the file is truncated or corrupt: download it again",
        ) from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointError(file, "is not a state dict of named tensors; expected Meta's consolidated.NN.pth")
    return sd


def shard_files(path: Path) -> list[Path]:
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise CheckpointError(path, "no consolidated.*.pth files; a Meta checkpoint folder holds params.json and them")
    numbers = []
    for f in files:
        try:
            numbers.append(int(f.name.split(".")[1]))
        except ValueError:
            raise CheckpointError(f, "shard file name must be consolidated.NN.pth with NN a number") from None
    if numbers != list(range(len(files))):
        raise CheckpointError(
            path, f"shard numbers {numbers} are not 00..{len(files) - 1:02d}; a shard is missing, get the full folder"
        )
    return files
