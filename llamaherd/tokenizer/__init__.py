"""Tokenizers for every Llama generation: tiktoken BPE, SentencePiece, Hugging Face tokenizer.json."""

from .base import Tokenizer, detect_kind
from .streaming import StreamDecoder

__all__ = ["StreamDecoder", "Tokenizer", "detect_kind"]
