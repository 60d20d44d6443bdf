"""Checkpoint formats: Meta consolidated.*.pth, Hugging Face safetensors, GGUF; all map onto Meta's names."""

from .base import Checkpoint, materialize
from .detect import detect_format, read

__all__ = ["Checkpoint", "detect_format", "materialize", "read"]
