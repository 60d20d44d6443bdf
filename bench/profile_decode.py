"""Where a decode step's time goes: cProfile (Python + native kernel calls) and torch.profiler (aten ops).

  .venv/bin/python bench/profile_decode.py gemma-3-270m-q4_k_m --threads 2 -n 32
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamaherd import load  # noqa: E402
from llamaherd.engine.generate import decode_one, prefill  # noqa: E402
from llamaherd.model.cache import KVCache  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("--dtype", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    net = load(args.model, dtype=getattr(torch, args.dtype) if args.dtype else None).net.eval()
    dtype = next(p.dtype for p in net.parameters() if p.is_floating_point())

    @torch.inference_mode()
    def steps(n: int) -> float:
        cache = KVCache.for_model(net.config, 1, n + 2, dtype=dtype)
        tok = prefill(net, torch.tensor([[2]]), cache).argmax(-1)
        t = time.perf_counter()
        for _ in range(n):
            tok = decode_one(net, tok, cache).argmax(-1)
        return (time.perf_counter() - t) / n * 1e3

    steps(4)
    print(f"plain: {steps(args.n):.2f} ms/token")
    prof = cProfile.Profile()
    prof.enable()
    steps(args.n)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)
    with torch.profiler.profile() as tp:
        steps(8)
    print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
