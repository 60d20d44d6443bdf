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

With --ab REV it instead compares two builds of the int8 kernels, ggml_q8.c (with its headers) as of git REV
against the working tree's, each compiled alone with the package's flags, on the one-row K-quant products of
the Llama 3.2 1B shape. Each product cycles through copies of its weight totalling >= --ab-mib MiB, so every
call reads memory as a decode step does; the two builds alternate round by round and each keeps its fastest
single call, which a shared machine disturbs least:

    .venv/bin/python bench/kernels.py --ab HEAD --threads 1 --rounds 15
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from llamaherd.quant.ggml_quants import ggml_type
from llamaherd import native
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


# the one-row K-quant products of a Llama 3.2 1B Q4_K_M file (llama.cpp's mix, 16 layers): (role, type, N, K,
# products per token)
AB_SHAPES = [
    ("attn_q, attn_output", "Q4_K", 2048, 2048, 32),
    ("attn_k, attn_v (8 layers)", "Q4_K", 512, 2048, 24),
    ("ffn_gate, ffn_up", "Q4_K", 8192, 2048, 32),
    ("ffn_down (8 layers)", "Q4_K", 2048, 8192, 8),
    ("attn_v (the other 8)", "Q6_K", 512, 2048, 8),
    ("ffn_down (the other 8)", "Q6_K", 2048, 8192, 8),
    ("token_embd / output (tied)", "Q6_K", 128256, 2048, 1),
]
# With --rows > 1 (batched decode) also the block-of-32 types: the 1B's Q4_0 / Q8_0 feed-forward and Gemma 3
# 270M's tied Q8_0 vocabulary projection (not counted in the token's K-quant sum).
AB_SHAPES_32 = [("ffn_gate, ffn_up (1B)", "Q4_0", 8192, 2048, 0), ("ffn_gate, ffn_up (1B)", "Q8_0", 8192, 2048, 0),
                ("output (Gemma 3 270M, tied)", "Q8_0", 262144, 640, 0)]
_Q8_FILES = ("ggml_q8.c", "ggml_q8.h", "common.h")


def build_q8(src_dir: Path, out: Path, extra: list[str]) -> ctypes.CDLL:
    """ggml_q8.c of src_dir compiled alone (it needs only its headers) with the package's flags and `extra`."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    subprocess.run([cc, *native._FLAGS, *extra, str(src_dir / "ggml_q8.c"), "-lm", "-o", str(out)], check=True)
    lib = ctypes.CDLL(str(out))
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.lh_q8_gemv.argtypes = [cint, ptr, i64, i64, i64, ptr, i64, ptr, cint]
    return lib


def kernel_ab(rev: str, threads: int, rounds: int, mib: int, cflags: tuple[str, str], M: int = 1) -> None:
    """GB/s of the M-row products (one row: decode), ggml_q8.c at git `rev` (old) against the working tree's (new); `rev` "." is
    the working tree too (to compare two sets of compiler flags, `cflags` = (old's, new's))."""
    here = Path(native.__file__).parent
    repo = Path(subprocess.run(["git", "-C", str(here), "rev-parse", "--show-toplevel"], check=True,
                               capture_output=True, text=True).stdout.strip())
    rel = here.relative_to(repo)
    with tempfile.TemporaryDirectory() as tmp:
        old_dir = here if rev == "." else Path(tmp) / "old"
        if rev != ".":
            old_dir.mkdir()
            for f in _Q8_FILES:
                (old_dir / f).write_bytes(subprocess.run(["git", "-C", str(repo), "show", f"{rev}:{rel / f}"],
                                                         check=True, capture_output=True).stdout)
        libs = {"old": build_q8(old_dir, Path(tmp) / "old.so", cflags[0].split()),
                "new": build_q8(here, Path(tmp) / "new.so", cflags[1].split())}
        print(f"ggml_q8.c at {rev} {cflags[0]} (old) vs working tree {cflags[1]} (new); {threads} thread(s); M = {M}; "
              "GB/s of packed bytes, "
              f"fastest call of {rounds} rounds over >= {mib} MiB of weight copies; load average {os.getloadavg()[0]:.2f}")
        print("| product | type | N x K | MB | per token | old GB/s | new GB/s | new/old | y equal |")
        print("|---|---|---|---:|---:|---:|---:|---:|---|")
        token = {k: 0.0 for k in libs}
        for role, name, N, K, count in AB_SHAPES + (AB_SHAPES_32 if M > 1 else []):
            one = random_packed(name, N, K)
            copies = [one] + [one.clone() for _ in range(max(1, -(-mib * 2**20 // one.numel())) - 1)]
            x = torch.randn(M, K)
            ys = {k: torch.empty(M, N) for k in libs}
            tid = ggml_type(name).id
            best = {k: float("inf") for k in libs}
            # the vocabulary matrix (a call of ~50 ms is rarely left alone on a loaded machine) is timed in
            # blocks of 8192 rows, each a call of its own on the next rows: the same stream through memory
            rows = N if N <= 16384 else 8192
            y_block = torch.empty(M, rows)
            for k, lib in libs.items():  # whole products once, for the equality column
                lib.lh_q8_gemv(tid, one.data_ptr(), N, one.stride(0), K, x.data_ptr(), M, ys[k].data_ptr(), threads)
            for _ in range(rounds):
                for k, lib in libs.items():
                    for w in copies:  # each call timed alone: the fastest is the one nothing else interrupted
                        for r0 in range(0, N - rows + 1, rows):
                            start = time.perf_counter()
                            lib.lh_q8_gemv(tid, w[r0].data_ptr(), rows, w.stride(0), K, x.data_ptr(), M,
                                           y_block.data_ptr(), threads)
                            best[k] = min(best[k], (time.perf_counter() - start) * N / rows)
            gb = one.numel() / 1e9
            diff = (ys["new"] - ys["old"]).abs().max().item() / ys["old"].abs().max().item()
            for k in libs:
                token[k] += count * best[k]
            print(f"| {role} | {name} | {N} x {K} | {one.numel() / 1e6:.1f} | {count} | {gb / best['old']:.1f} | "
                  f"{gb / best['new']:.1f} | {best['old'] / best['new']:.2f}x | "
                  f"{'yes' if diff == 0 else f'{diff:.1e} rel.'} |", flush=True)
            del copies, one
        print(f"one token's K-quant products (the counts above): old {1e3 * token['old']:.1f} ms, new "
              f"{1e3 * token['new']:.1f} ms ({token['old'] / token['new']:.2f}x); load average at the end "
              f"{os.getloadavg()[0]:.2f}")


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
    ap.add_argument("--ab", metavar="REV", help="old ggml_q8.c (git REV) vs the working tree's (K-quants; --rows)")
    ap.add_argument("--ab-mib", type=int, default=512, help="MiB of weight copies per product (--ab)")
    ap.add_argument("--old-cflags", default="", help="extra compiler flags of the old build (--ab)")
    ap.add_argument("--new-cflags", default="", help="... of the new one, e.g. --new-cflags=-DPREFETCH_BYTES=0")
    a = ap.parse_args()
    if a.ab:
        kernel_ab(a.ab, a.threads[0], a.rounds, a.ab_mib, (a.old_cflags, a.new_cflags), a.rows)
        return
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
