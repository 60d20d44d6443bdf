"""Tiny models for the fine-tuning tests: a random Llama saved as a Hugging Face folder with a byte-level tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from llamaherd.config import ModelConfig

from .chat_fixtures import tiny_hf_tokenizer_json
from .checkpoint_fixtures import hf_reference

# Gemma's turn markers: the tiny models speak the gemma3 chat format (chat_format="gemma3").
SPECIALS = ["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"]
CONFIG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=272, multiple_of=32,
                     rope_theta=500000.0, max_seq_len=256)


def tiny_folder(dst: Path, config: ModelConfig = CONFIG, seed: int = 0, std: float = 0.05):
    """(folder, transformers model): a random LlamaForCausalLM saved with save_pretrained plus a tokenizer."""
    ref = hf_reference(config, seed=seed, std=std)
    ref.save_pretrained(dst)
    tiny_hf_tokenizer_json(dst, SPECIALS)
    (dst / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>"}))
    return dst, ref


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def qa(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
