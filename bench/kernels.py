"""Matrix-vector kernel speed on packed ggml weights: float activations (native/ggml.c `lh_gemv`) against int8
activations (native/ggml_q8.c `lh_q8_gemv`), in GB/s of packed weight bytes read per product.

Shapes are the decode products of Gemma 3 270M Q4_K_M and of a Llama 3.2 1B-shaped model (Q8_0 / Q4_0), one
activation row (M = 1) unless --rows says otherwise. Weights are random valid blocks (speed does not depend on
the values). Both paths run in one process, alternating round by round, each timing the median of --rounds
rounds; a round repeats the product for at least --min-ms. The native call is made through ctypes directly
(~1 us of overhead, which matters only for the smallest shapes).

    .venv/bin/python bench/kernels.py [--threads 1 2] [--rounds 7] [--only gemma|llama1b]

With --decode MODEL it instead times whole decode steps of MODEL (as bench/profile_decode.py's "plain"
figure), INT8_ACTIVATIONS on and off alternating in one process, and prints the median ms/token of each:

    .venv/bin/python bench/kernels.py --decode gemma-3-270m-q4_k_m --threads 2 --rounds 7 -n 32
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from llamaherd.quant.ggml_quants import ggml_type
from llamaherd.native import ggml_kernels

# (model, role, type, N, K)
SHAPES = [
    ("gemma", "token_embd / output (tied)", "Q8_0", 262144, 640),
    ("gemma", "ffn_gate, ffn_up", "Q5_0", 2048, 640),
    ("gemma", "attn_q", "Q5_0", 1024, 640),
    ("gemma", "attn_output", "Q4_K", 640, 1024),
    ("gemma", "ffn_down (Q4_K layers)", "Q4_K", 640, 2048),
    ("gemma", "ffn_down (Q6_K layers)", "Q6_K", 640, 2048),
    ("llama1b", "ffn_gate, ffn_up", "Q8_0", 8192, 2048),
    ("llama1b", "ffn_down", "Q8_0", 2048, 8192),
    ("llama1b", "output", "Q8_0", 128256, 2048),
    ("llama1b", "ffn_gate, ffn_up", "Q4_0", 8192, 2048),
    ("llama1b", "ffn_down", "Q4_0", 2048, 8192),
    ("llama1b", "(Q5_K, for coverage)", "Q5_K", 2048, 2048),
]

# byte offsets of each type's float16 scale fields (ggml-common.h)
F16_AT = {"Q4_0": (0,), "Q5_0": (0,), "Q8_0": (0,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_packed(name: str, rows: int, cols: int) -> torch.Tensor:
    t = ggml_type(name)
    nb = rows * cols // t.block_size
    b = torch.randint(0, 256, (nb, t.type_size), dtype=torch.uint8)
    for at in F16_AT[name]:
        b[:, at : at + 2] = (torch.rand(nb, 1) * 0.02 - 0.01).half().view(torch.uint8)
    return b.reshape(rows, cols // t.block_size * t.type_size)


def time_call(fn, args, min_s: float) -> float:
    """Seconds per call, over as many calls as fit in min_s (at least 3)."""
    n, start = 0, time.perf_counter()
    while True:
        fn(*args)
        n += 1
        el = time.perf_counter() - start
        if n >= 3 and el >= min_s:
            return el / n


def decode_ab(model: str, threads: int, rounds: int, n: int) -> None:
    """Median ms per decode step with int8 and with float activations, alternating in one process."""
    from profile_decode import steps as decode_ms  # bench/profile_decode.py: ms per greedy decode step

    from llamaherd import load

    torch.set_num_threads(threads)
    net = load(model).net.eval()
    dtype = next(p.dtype for p in net.parameters() if p.is_floating_point())

    def steps() -> float:
        return decode_ms(net, n, dtype)

    res: dict[bool, list[float]] = {True: [], False: []}
    for r in range(rounds + 1):
        for on in (True, False):
            ggml_kernels.INT8_ACTIVATIONS = on
            ms = steps()
            if r:  # the first round warms up both
                res[on].append(ms)
    ggml_kernels.INT8_ACTIVATIONS = True
    print(f"{model}, {threads} threads, {n} steps x {rounds} rounds, load average {os.getloadavg()[0]:.2f}: "
          f"int8 activations {statistics.median(res[True]):.2f} ms/token, float {statistics.median(res[False]):.2f} "
          f"(all: int8 {[round(v, 2) for v in res[True]]}, float {[round(v, 2) for v in res[False]]})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--rows", type=int, default=1, help="activation rows M (1..64)")
    ap.add_argument("--min-ms", type=float, default=40.0)
    ap.add_argument("--only", choices=["gemma", "llama1b"])
    ap.add_argument("--decode", metavar="MODEL", help="time decode steps of MODEL instead (int8 vs float)")
    ap.add_argument("-n", type=int, default=32, help="decode steps per round (--decode)")
    a = ap.parse_args()
    if ggml_kernels.library() is None:
        raise SystemExit("native library unavailable (no C compiler?)")
    if a.decode:
        decode_ab(a.decode, a.threads[0], a.rounds, a.n)
        return
    paths = {"float": ggml_kernels._fn("lh_gemv"), "int8": ggml_kernels._fn("lh_q8_gemv")}
    print(f"load average {os.getloadavg()[0]:.2f}; M = {a.rows}; GB/s of packed bytes, median of {a.rounds} rounds")
    print(f"| model | product | type | N x K | MB | " + " | ".join(f"{p} {t}T" for t in a.threads for p in paths) + " | int8/float |")
    print("|---|---|---|---|---:|" + "---:|" * (2 * len(a.threads) + 1))
    for model, role, name, N, K in SHAPES:
        if a.only and model != a.only:
            continue
        packed = random_packed(name, N, K)
        x = torch.randn(a.rows, K)
        y = torch.empty(a.rows, N)
        tid = ggml_type(name).id
        res: dict[tuple[str, int], list[float]] = {}
        for _ in range(a.rounds):
            for t in a.threads:
                for p, fn in paths.items():
                    args = (tid, packed.data_ptr(), N, packed.stride(0), K, x.data_ptr(), a.rows, y.data_ptr(), t)
                    res.setdefault((p, t), []).append(time_call(fn, args, a.min_ms / 1e3))
        gb = packed.numel() / 1e9
        rates = {k: gb / statistics.median(v) for k, v in res.items()}
        ratios = "/".join(f"{rates[('int8', t)] / rates[('float', t)]:.2f}x" for t in a.threads)
        print(f"| {model} | {role} | {name} | {N} x {K} | {packed.numel() / 1e6:.1f} | "
              + " | ".join(f"{rates[(p, t)]:.1f}" for t in a.threads for p in paths) + f" | {ratios} |", flush=True)
        del packed


if __name__ == "__main__":
    main()
