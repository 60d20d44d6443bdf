"""Training checkpoints: trainable weights, optimizer, scheduler, RNG states and data position, written atomically.

The file is written to a temporary name in the same folder, flushed and fsync'd, then renamed over the previous
checkpoint (and the folder fsync'd), so a run killed at any instant leaves either the old or the new checkpoint,
never a torn one. Loading uses `torch.load(weights_only=True)`: tensors and plain containers only.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from ..atomic import replacing
from ..errors import TrainingError

FILE = "checkpoint.pt"


def rng_state() -> dict:
    py = random.getstate()
    return {"torch": torch.get_rng_state(), "python": [py[0], list(py[1]), py[2]]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def atomic_save(obj: dict, path: Path) -> None:
    with replacing(path) as tmp:
        torch.save(obj, tmp)


def save(out: Path, *, weights: dict, optimizer: dict, scheduler, step: int, position: int,
         fingerprint: dict) -> Path:
    """One checkpoint: `optimizer` is the optimizer's state dict, `position` the micro-batches consumed so far."""
    path = Path(out) / FILE
    atomic_save({"weights": weights, "optimizer": optimizer, "scheduler": scheduler.state_dict(),
                 "rng": rng_state(), "step": step, "position": position, "fingerprint": fingerprint}, path)
    return path


def load(out: Path, fingerprint: dict) -> dict:
    """The checkpoint of a run in `out`, refusing one written by a run with other settings or another model."""
    path = Path(out) / FILE
    if not path.is_file():
        raise TrainingError(f"{out}: no {FILE} to resume from; start the run without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file: say so instead of a pickle traceback
        raise TrainingError(f"{path}: unreadable checkpoint ({exc}); delete it to start over") from None
    theirs = state.get("fingerprint", {})
    differ = sorted(k for k in set(theirs) | set(fingerprint) if theirs.get(k) != fingerprint.get(k))
    if differ:
        raise TrainingError(f"{path}: written by a run with other settings ({', '.join(differ)}: "
                            + "; ".join(f"{k} {theirs.get(k)!r} vs {fingerprint.get(k)!r}" for k in differ)
                            + "); resume with the same settings, or use another --out")
    return state
