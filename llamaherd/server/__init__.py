"""`herd serve`: OpenAI- and Ollama-compatible HTTP APIs over the continuous-batching engine."""

from .app import create_app
from .runtime import ServedModel

__all__ = ["ServedModel", "create_app"]
