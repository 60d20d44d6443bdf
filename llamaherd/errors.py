"""Typed errors raised at the package's boundaries; each message says what is wrong and what to do."""

from __future__ import annotations

from pathlib import Path


class LlamaherdError(Exception):
    """Base class of every error llamaherd raises on bad input."""


class CheckpointError(LlamaherdError):
    """A checkpoint file or folder is missing, malformed or inconsistent."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = Path(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path is not None else problem)


class GGUFError(CheckpointError):
    """A GGUF file is malformed, hostile or uses something this version cannot read."""


class TokenizerError(LlamaherdError):
    """A tokenizer file is missing or malformed."""


class ChatFormatError(LlamaherdError):
    """Messages or tools cannot be rendered in the model's chat format."""


class ContextLengthError(LlamaherdError):
    """A prompt (plus the tokens asked for) does not fit the model's context window."""


class ModelNotFoundError(LlamaherdError):
    """A model name is neither a path nor known to the local store."""


class DatasetError(LlamaherdError):
    """A training data file is malformed or an example cannot be trained on (the message names file and line)."""


class TrainingError(LlamaherdError):
    """A training run cannot start or resume: bad options, a checkpoint or adapter that does not fit the model."""


class ImageError(LlamaherdError):
    """An image cannot be used: unreadable, corrupt, too large, a refused URL, or sent to a text-only model."""


class WriteError(LlamaherdError, OSError):
    """A file cannot be written: no room on its disk (the partial file is removed, the old one kept)."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        LlamaherdError.__init__(self, f"{path}: {problem}")

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"
