"""Shared helpers of the GGUF writer tests: tiny k-quant-shaped Llama checkpoints and GGUF reading via gguf-py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import gguf

from llamaherd.checkpoint.base import Checkpoint
from llamaherd.config import ModelConfig, RopeScaling
from tests.conftest import random_model

# Llama 3 shaped, but wide enough (dim 256 = one k-quant super-block) for Q4_K/Q5_K/Q6_K to apply; the
# FFN width 384 is not a multiple of 256, so ffn_down exercises llama.cpp's fallback types.
KQ_LLAMA3 = ModelConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=384,
                        rope_theta=500000.0, max_seq_len=1024, norm_eps=1e-5)
KQ_LLAMA31 = KQ_LLAMA3.replace(rope_scaling=RopeScaling(factor=8.0), max_seq_len=131072)


def checkpoint(config: ModelConfig, *, seed: int = 0, std: float = 0.05, tokenizer=None, source: Path | None = None) -> Checkpoint:
    net = random_model(config, seed=seed, std=std)
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return Checkpoint(config=config, state_dict=sd, source=source or Path("random-llama"), tokenizer=tokenizer)


def read_field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def read_tensors(path: Path) -> dict[str, tuple[gguf.GGMLQuantizationType, np.ndarray]]:
    """GGUF name -> (type, raw data as gguf-py exposes it: uint8 rows for quantized types)."""
    r = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type, np.array(t.data)) for t in r.tensors}


def dequantized(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file decoded by gguf-py's reference decoder, in torch (row-major) shape."""
    out = {}
    for name, (qtype, data) in read_tensors(path).items():
        out[name] = torch.from_numpy(np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32).copy())
    return out
