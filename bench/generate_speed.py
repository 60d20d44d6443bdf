"""Greedy generation speed of llamaherd's simple path (prefill + cached decode) against transformers' generate.

Both run the same random weights (converted with llamaherd's HF writer) in float32 on CPU with one thread;
the script checks the two produce the same tokens before reporting. Times are CPU seconds of this process
(the dev machine is shared, so wall time is noisy), best of --repeat.

Usage: .venv/bin/python bench/generate_speed.py [--dim 512] [--layers 8] [--prompt 128] [--new 64] [--repeat 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from llamaherd.checkpoint.base import Checkpoint
from llamaherd.checkpoint.hf import write
from llamaherd.config import ModelConfig
from llamaherd.engine import SamplingParams, make_sampler
from llamaherd.engine.generate import generate_tokens
from llamaherd.engine.stats import GenerationStats
from llamaherd.model import build


def best(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.process_time()
        out = fn()
        times.append(time.process_time() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import transformers

    config = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.dim // 64, n_kv_heads=args.dim // 256,
                         vocab_size=args.vocab, multiple_of=256, rope_theta=5e5, max_seq_len=4096)
    torch.manual_seed(0)
    net = build(config)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.05 * torch.randn_like(p))
    n_params = sum(p.numel() for p in net.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        write(Checkpoint(config, net.state_dict(), Path(tmp)), Path(tmp) / "hf")
        hf = transformers.LlamaForCausalLM.from_pretrained(Path(tmp) / "hf", torch_dtype=torch.float32).eval()
    prompt = torch.randint(0, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))

    def ours():
        sampler = make_sampler(SamplingParams(temperature=0, max_tokens=args.new), args.vocab)
        stats = GenerationStats()
        toks = [s.tokens[0] for s in generate_tokens(net, prompt.tolist(), sampler, stats=stats)]
        return toks, stats

    def theirs():
        with torch.no_grad():
            return hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                               max_new_tokens=args.new, min_new_tokens=args.new, eos_token_id=None,
                               pad_token_id=0)[0, args.prompt:].tolist()

    def prefill_only(model_call):
        with torch.no_grad():
            return model_call()

    t_ours, (tok_ours, _) = best(ours, args.repeat)
    t_hf, tok_hf = best(theirs, args.repeat)
    assert tok_ours == tok_hf, "llamaherd and transformers disagree on the greedy tokens"
    p_ours, _ = best(lambda: prefill_only(lambda: net(prompt)), args.repeat)
    p_hf, _ = best(lambda: prefill_only(lambda: hf(prompt).logits), args.repeat)
    print(f"model: dim {args.dim}, {args.layers} layers, vocab {args.vocab}, {n_params / 1e6:.1f}M params, float32, "
          f"1 thread; prompt {args.prompt} tokens, {args.new} new tokens (greedy, identical tokens checked)")
    print("| path | prefill cpu-s | generate cpu-s | decode tokens/s (cpu) |")
    print("|------|--------------:|---------------:|----------------------:|")
    for name, p, t in (("llamaherd", p_ours, t_ours), ("transformers", p_hf, t_hf)):
        print(f"| {name} | {p:.3f} | {t:.3f} | {args.new / max(t - p, 1e-9):.1f} |")


if __name__ == "__main__":
    main()
