"""Evaluation: perplexity and KL divergence as llama.cpp computes them, and the lm-evaluation-harness backend."""

from .kld import Comparison, compare, save_base
from .perplexity import Perplexity, perplexity

__all__ = ["Comparison", "Perplexity", "compare", "perplexity", "save_base"]
