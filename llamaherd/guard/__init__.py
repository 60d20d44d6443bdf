"""Llama Guard and Prompt Guard: `moderate` a conversation, `classify_prompt` a text; shields build on these."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

from .llama_guard import LlamaGuard
from .prompt import LLAMA_GUARD_3_CATEGORIES, RELEASES, GuardError
from .prompt_guard import PromptGuard, PromptScores
from .verdict import Verdict, parse

__all__ = ["moderate", "classify_prompt", "load_llama_guard", "load_prompt_guard", "LlamaGuard", "PromptGuard",
           "Verdict", "PromptScores", "GuardError", "LLAMA_GUARD_3_CATEGORIES", "RELEASES", "parse"]


@lru_cache(maxsize=2)
def _loaded_model(source: str):
    from ..api import load

    return load(source)


def load_llama_guard(model, release: str | None = None, **options) -> LlamaGuard:
    """A `LlamaGuard` from a loaded `Model`, or from anything `llamaherd.load` accepts (loaded once, cached)."""
    if isinstance(model, LlamaGuard):
        return model
    if isinstance(model, (str, Path)):
        model = _loaded_model(str(model))
    return LlamaGuard(model, release, **options)


def load_prompt_guard(model) -> PromptGuard:
    """A `PromptGuard` from a Hugging Face folder (config.json, weights, tokenizer.json), loaded once."""
    if isinstance(model, PromptGuard):
        return model
    return _loaded_prompt_guard(str(model))


@lru_cache(maxsize=2)
def _loaded_prompt_guard(folder: str) -> PromptGuard:
    return PromptGuard.from_folder(folder)


def moderate(messages: Sequence[Mapping] | str, role: str | None = None, *, model, release: str | None = None,
             categories: Mapping[str, str] | None = None, excluded: Sequence[str] = (),
             threshold: float | None = None) -> Verdict:
    """Llama Guard's verdict on the last message (of `role`: 'user' or 'assistant') of a conversation.

    `messages` are OpenAI-shaped dicts alternating user/assistant (a bare string is one user message);
    `categories` replaces the release's list (code -> name), `excluded` drops codes from it; with `threshold`,
    `flagged` is P(unsafe) >= threshold instead of the generated answer.
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    guard = load_llama_guard(model, release)
    return guard.moderate(messages, role, categories=categories, excluded=excluded, threshold=threshold)


def classify_prompt(text: str | Sequence[str], *, model, batch_size: int = 16) -> PromptScores | list[PromptScores]:
    """Prompt Guard's label probabilities for a text (or several), long texts scanned in windows."""
    return load_prompt_guard(model).classify(text, batch_size=batch_size)
