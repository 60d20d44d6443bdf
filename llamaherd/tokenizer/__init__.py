"""Tokenizers for every Llama generation: tiktoken BPE, SentencePiece, Hugging Face tokenizer.json, GGUF metadata."""

from . import gguf_vocab
from .base import Tokenizer, detect_kind
from .hf_json import HFTokenizer
from .spm import SentencePieceTokenizer
from .streaming import StreamDecoder
from .tiktoken_bpe import TiktokenTokenizer

# `Tokenizer.from_file` dispatches on the kind detected from the file's first bytes.
Tokenizer.readers.update(
    tiktoken=TiktokenTokenizer.from_file,
    sentencepiece=SentencePieceTokenizer.from_file,
    hf=HFTokenizer.from_file,
    gguf=gguf_vocab.from_gguf,
)

__all__ = ["StreamDecoder", "Tokenizer", "detect_kind"]
