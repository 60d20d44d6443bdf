"""Model definitions: one file per forward pass, found through `registry`."""

from .cache import KVCache
from .registry import build, model_class

__all__ = ["KVCache", "build", "model_class"]
