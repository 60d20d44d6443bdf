"""Write a random-weight model shaped like Llama 3.2 1B as a bf16 HF folder, then Q8_0 and Q4_0 GGUF files.

The shape is the preset row `llama-3.2-1b` (dim 2048, 16 layers, 32/8 heads, ffn 8192, vocab 128256, tied
embeddings). Weights are random (N(0, 0.02)): speed does not depend on their values. The HF folder is written
by transformers itself; the GGUF files by `herd quantize`, the same files llama.cpp then reads.
"""

from __future__ import annotations

import argparse
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
    for qtype in ("q8_0", "q4_0"):
        dst = out / f"{qtype}.gguf"
        if not dst.exists():
            subprocess.run([sys.executable, "-m", "llamaherd", "quantize", "--quiet", "--type", qtype, str(hf), str(dst)],
                           check=True)
            print("wrote", dst, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
