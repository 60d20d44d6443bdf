"""Checkpoint formats: Meta consolidated.*.pth, Hugging Face safetensors, GGUF; all map onto Meta's names."""

from .base import Checkpoint, materialize
from .load import detect_format, load, read

__all__ = ["Checkpoint", "detect_format", "load", "materialize", "read"]
