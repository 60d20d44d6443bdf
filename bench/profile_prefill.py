"""Where a prefill's time goes: tokens/s of one P-token prefill, then torch.profiler's aten table.

  .venv/bin/python bench/profile_prefill.py gemma-3-270m-q4_k_m -p 512 --threads 2
  .venv/bin/python bench/profile_prefill.py gemma-3-270m-q4_k_m -p 512 --float   # float32 GEMMs (BF16_PREFILL off)

Native calls (weight decoding) do not appear in the aten table: the table's total against the wall time
shows their share.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamaherd import load  # noqa: E402
from llamaherd.engine.generate import prefill  # noqa: E402
from llamaherd.model.cache import KVCache  # noqa: E402
from llamaherd.native import ggml_kernels  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--float", action="store_true", help="float32 GEMMs instead of bf16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ggml_kernels.BF16_PREFILL = ggml_kernels.BF16_PREFILL and not args.float
    net = load(args.model).net.eval()
    tokens = torch.arange(args.p)[None] * 7919 % 32000 + 100

    @torch.inference_mode()
    def once() -> float:
        cache = KVCache.for_model(net.config, 1, args.p + 1)
        t = time.perf_counter()
        prefill(net, tokens, cache)
        return time.perf_counter() - t

    once()
    times = [once() for _ in range(3)]
    print(f"pp{args.p}: {[round(args.p / t, 1) for t in times]} tok/s (bf16 GEMMs: {ggml_kernels.BF16_PREFILL})")
    with torch.profiler.profile() as prof:
        once()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
