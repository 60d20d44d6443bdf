"""Write a random-weight model shaped like Llama 3.2 1B as a bf16 HF folder, then Q8_0 and Q4_0 GGUF files.

The shape is the preset row `llama-3.2-1b` (dim 2048, 16 layers, 32/8 heads, ffn 8192, vocab 128256, tied
embeddings). Weights are random (N(0, 0.02)): speed does not depend on their values. The HF folder is written
by transformers itself, plus Meta's Llama 3 `tokenizer.model` from the installed llama_models package (llama.cpp
refuses a GGUF without a vocabulary); the GGUF files by `herd quantize`, the same files llama.cpp then reads.
A GGUF lacking `tokenizer.ggml.model` (written before the tokenizer was copied) is rewritten with the vocabulary
added by the GGUF writer's `add_vocab`, tensors copied byte for byte.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="/tmp/llamaherd-bench/llama-3.2-1b-random")
    args = ap.parse_args()
    out = Path(args.out)
    hf = out / "hf-bf16"
    if not (hf / "config.json").exists():
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
            num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
            rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=128000,
            eos_token_id=128001,
            rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192},
        )
        torch.manual_seed(0)
        with torch.device("cpu"):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(hf)
        print("wrote", hf, flush=True)
    if not (hf / "tokenizer.model").exists():
        import llama_models

        shutil.copy(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model", hf / "tokenizer.model")
    for qtype in ("q8_0", "q4_0"):
        dst = out / f"{qtype}.gguf"
        if not dst.exists():
            subprocess.run([sys.executable, "-m", "llamaherd", "quantize", "--quiet", "--type", qtype, str(hf), str(dst)],
                           check=True)
            print("wrote", dst, flush=True)
        ensure_vocab(dst)
    return 0


def ensure_vocab(path: Path) -> None:
    """Rewrite `path` with the Llama 3 vocabulary when it has none (metadata and tensor bytes kept)."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    from llamaherd.checkpoint.gguf_write import add_vocab
    from llamaherd.tokenizer import Tokenizer

    r = GGUFReader(str(path))
    if "tokenizer.ggml.model" in r.fields:
        return
    tmp = path.with_suffix(".vocab.tmp")
    w = GGUFWriter(str(tmp), "llama")
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vt = f.types[0]
        w.add_key_value(name, f.contents(), vt, sub_type=f.types[-1] if vt == GGUFValueType.ARRAY else None)
    add_vocab(w, Tokenizer.llama3(), 128256)
    for t in r.tensors:
        w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    del r
    tmp.replace(path)
    print("added the Llama 3 vocabulary to", path, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
