"""GB/s of one-row bf16 products: llamaherd's native kernel (llamaherd/native/dense.py) vs torch's `F.linear`.

The shapes are the Llama 3.2 1B's (wq/wo 2048x2048, wk/wv 512x2048, w1/w3 8192x2048, w2 2048x8192, the tied
output 128256x2048). Each shape cycles through enough copies of its weight (>= --mib MiB) that every call
reads from memory, not cache, as a decode step does. Kernel and torch alternate within each round (load from
other processes hits both alike); each figure is the median of --rounds rounds.

  .venv/bin/python bench/dense_gemv.py --threads 2

With --model (a bf16 checkpoint), instead an in-process A/B of whole decode steps (ms/token, median of rounds,
variants alternating): the kernels with grouped projections, without grouping, and switched off (torch).

  .venv/bin/python bench/dense_gemv.py --threads 2 --model /tmp/llamaherd-bench/llama-3.2-1b-random/hf-bf16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamaherd.native import dense  # noqa: E402

SHAPES = [(2048, 2048), (512, 2048), (8192, 2048), (2048, 8192), (128256, 2048)]


def decode_ab(model: str, steps: int, rounds: int) -> None:
    from llamaherd import native
    from llamaherd import load
    from llamaherd.engine.generate import decode_one, prefill
    from llamaherd.model.cache import KVCache

    net = load(model, dtype=torch.bfloat16).net.eval()
    linears = [m for m in net.modules() if isinstance(m, dense.DenseLinear)]
    groups = {m: m.group for m in linears}

    @torch.inference_mode()
    def ms_per_token() -> float:
        cache = KVCache.for_model(net.config, 1, steps + 2, dtype=torch.bfloat16)
        tok = prefill(net, torch.tensor([[2]]), cache).argmax(-1)
        t = time.perf_counter()
        for _ in range(steps):
            tok = decode_one(net, tok, cache).argmax(-1)
        return (time.perf_counter() - t) / steps * 1e3

    def grouped() -> float:
        return ms_per_token()

    def ungrouped() -> float:
        for m in linears:
            m.group = None
        try:
            return ms_per_token()
        finally:
            for m in linears:
                m.group = groups[m]

    def torch_only() -> float:
        with native.disabled():
            return ms_per_token()

    variants = {"kernel, grouped": grouped, "kernel, ungrouped": ungrouped, "torch (native.disabled())": torch_only}
    for fn in variants.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(fn())
    print(f"| variant | ms/token (median of {rounds} x {steps} steps) | all rounds |")
    print("|---|---:|---|")
    for name, v in times.items():
        print(f"| {name} | {statistics.median(v):.1f} | {' '.join(f'{t:.1f}' for t in v)} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=1, help="activation rows M (default 1: decode)")
    ap.add_argument("--mib", type=int, default=512, help="weight bytes cycled per shape (default 512 MiB)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--model", help="a bf16 checkpoint: A/B whole decode steps instead")
    ap.add_argument("-n", type=int, default=16, help="decode steps per round with --model (default 16)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not dense.available():
        print("native library unavailable (no compiler?): nothing to compare")
        return 1
    if args.model:
        print(f"# threads {args.threads}, load average {os.getloadavg()[0]:.2f}")
        decode_ab(args.model, args.n, args.rounds)
        print(f"# load average after: {os.getloadavg()[0]:.2f}")
        return 0
    print(f"# threads {args.threads}, M = {args.rows}, AVX512_BF16 path: {dense.uses_bf16_instructions()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| N x K | kernel GB/s | torch F.linear GB/s | ratio |")
    print("|---|---:|---:|---:|")
    torch.manual_seed(0)
    for N, K in SHAPES:
        nbytes = N * K * 2
        copies = max(1, args.mib * (1 << 20) // nbytes)
        ws = [torch.randn(N, K).bfloat16() for _ in range(copies)]
        x = torch.randn(args.rows, K).bfloat16()
        reps = max(copies, (256 << 20) // nbytes)  # >= 256 MiB read per timing
        times: dict[str, list[float]] = {"kernel": [], "torch": []}
        fns = {"kernel": lambda w: dense.gemv(x, w, torch.float32), "torch": lambda w: F.linear(x, w)}
        with torch.inference_mode():
            for name, fn in fns.items():  # warm-up over every copy: library build, oneDNN primitive caches,
                for w in ws:  # and the kernel's first touch of freshly allocated pages (slow here: ~1 GB/s)
                    fn(w)
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    t = time.perf_counter()
                    for i in range(reps):
                        fn(ws[i % copies])
                    times[name].append((time.perf_counter() - t) / reps)
        k, t = (nbytes / statistics.median(times[n]) / 1e9 for n in ("kernel", "torch"))
        print(f"| {N} x {K} | {k:.1f} | {t:.1f} | {k / t:.2f}x |", flush=True)
        del ws
    print(f"# load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
