"""Rows at which decode + bf16 GEMM overtakes the matrix-vector kernels for packed ggml products.

  .venv/bin/python bench/gemm_crossover.py --threads 2

Median ms of `ggml_kernels.gemv` (int8 activations) vs `ggml_kernels.linear` forced onto the GEMM path, on
Gemma 3 270M's and Llama 3.2 1B's shapes; sets `BF16_GEMM_MIN_ROWS` (native/ggml_kernels.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamaherd.quant.ggml_quants import ggml_type  # noqa: E402
from llamaherd.native import ggml_kernels  # noqa: E402
from tests.test_cpu_kernels import random_blocks  # noqa: E402

SHAPES = [("Q8_0", 2048, 2048), ("Q4_0", 8192, 2048), ("Q5_0", 2048, 640), ("Q4_K", 640, 2048), ("Q6_K", 640, 2048)]


def median_ms(f, n: int = 9) -> float:
    f()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return sorted(times)[n // 2] * 1e3


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 16, 24, 32, 64])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| type | N x K | rows | gemv ms | decode + GEMM ms |\n|---|---|---:|---:|---:|")
    for name, N, K in SHAPES:
        t = ggml_type(name)
        packed = random_blocks(name, N, K)
        for M in args.rows:
            x = torch.randn(M, K)
            gemv = median_ms(lambda: ggml_kernels.gemv(x, packed, t.id, K))
            saved, ggml_kernels.MAX_GEMV_ROWS, ggml_kernels.BF16_GEMM_MIN_ROWS = (
                (ggml_kernels.MAX_GEMV_ROWS, ggml_kernels.BF16_GEMM_MIN_ROWS), 0, 1)
            gemm = median_ms(lambda: ggml_kernels.linear(x, packed, t.id, K))
            ggml_kernels.MAX_GEMV_ROWS, ggml_kernels.BF16_GEMM_MIN_ROWS = saved
            print(f"| {name} | {N} x {K} | {M} | {gemv:.3f} | {gemm:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
