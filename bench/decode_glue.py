"""Decode ms/token with the native per-layer glue (llamaherd/native/ops.py) on and off, in one process.

  .venv/bin/python bench/decode_glue.py gemma-3-270m-q4_k_m --threads 1 --rounds 5 -n 64

Rounds alternate on/off (the matrix kernels stay on in both), each round a fresh cache: prefill a short
prompt, then n greedy decode steps timed together. Prints the median ms/token of each side, and how far the
two sides' logits are apart on the first steps (same tokens fed to both).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamaherd.checkpoint.load import load  # noqa: E402
from llamaherd.engine.generate import decode_one, prefill  # noqa: E402
from llamaherd.model.cache import KVCache  # noqa: E402
from llamaherd.native import ops  # noqa: E402

PROMPT = [2, 651, 6037, 576, 6081, 603]  # a few ids valid in every vocabulary here


@torch.inference_mode()
def decode_ms(net, dtype, n: int) -> float:
    cache = KVCache.for_model(net.config, 1, len(PROMPT) + n + 1, dtype=dtype)
    tok = prefill(net, torch.tensor([PROMPT]), cache).argmax(-1)
    t = time.perf_counter()
    for _ in range(n):
        tok = decode_one(net, tok, cache).argmax(-1)
    return (time.perf_counter() - t) / n * 1e3


@torch.inference_mode()
def logits_gap(net, dtype, n: int = 8) -> float:
    """Max |logit difference| between glue on and off over n teacher-forced decode steps (on's greedy tokens)."""
    caches = {on: KVCache.for_model(net.config, 1, len(PROMPT) + n + 1, dtype=dtype) for on in (True, False)}
    tok, gap = None, 0.0
    for step in range(n + 1):
        outs = {}
        for on, cache in caches.items():
            ops.ENABLED = on
            outs[on] = prefill(net, torch.tensor([PROMPT]), cache) if step == 0 else decode_one(net, tok, cache)
        ops.ENABLED = True
        gap = max(gap, float((outs[True] - outs[False]).abs().max()))
        tok = outs[True].argmax(-1)
    return gap


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-n", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    net = load(args.model).net.eval()
    dtype = next(p.dtype for p in net.parameters() if p.is_floating_point())
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    print(f"max |logit gap| on vs off, 8 steps: {logits_gap(net, dtype):.3g}")
    decode_ms(net, dtype, 4)  # warm up both sides
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for on in (False, True):
            ops.ENABLED = on
            times[on].append(decode_ms(net, dtype, args.n))
    ops.ENABLED = True
    for on in (False, True):
        print(f"glue {'native' if on else 'torch '}: median {statistics.median(times[on]):.2f} ms/token  "
              f"rounds {' '.join(f'{t:.2f}' for t in times[on])}")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
