"""`herd quantize SRC out.gguf --type q4_k_m`: write a checkpoint as a quantized (or F16/F32) GGUF file."""

from __future__ import annotations

import argparse
import time

TYPES = ("q4_k_m", "q5_k_m", "q6_k", "q8_0", "q4_0", "f16", "f32")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "quantize", help="quantize a checkpoint to GGUF (llama.cpp mixes q4_k_m, q5_k_m, q6_k, q8_0, q4_0)",
        description="Read SRC (Meta folder, Hugging Face folder, .gguf file or store name) and write a "
        "GGUF file llama.cpp can run. k-quant mixes give attn_v/ffn_down/output more bits as llama.cpp does. "
        "A quantized SRC is decoded and quantized again (with a warning: its rounding error stays).",
    )
    p.add_argument("src", help="checkpoint folder, .gguf file, or model name")
    p.add_argument("dst", help="output .gguf file")
    p.add_argument("--type", dest="qtype", default="q4_k_m", choices=TYPES, help="file type (default q4_k_m)")
    p.add_argument("--imatrix", metavar="FILE", help="importance matrix from `herd imatrix` or llama-imatrix (.dat or "
                   ".gguf): weights each column's rounding error by its mean squared activation")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint.gguf_write import print_progress, write
    from ..api import resolve
    from ..checkpoint import read

    start = time.perf_counter()
    im = None
    if args.imatrix:  # read first: a bad file fails before the checkpoint is read
        from ..quant import imatrix

        im = imatrix.read(args.imatrix)
    src = resolve(args.src)
    ckpt = read(src)
    out = write(ckpt, args.dst, qtype=args.qtype, progress=None if args.quiet else print_progress, imatrix=im)
    size = out.stat().st_size / 2**20
    used = f", imatrix of {len(im.entries)} entries" if im is not None else ""
    print(f"wrote {args.qtype} GGUF to {out} ({size:.1f} MiB, {time.perf_counter() - start:.1f} s{used})")
    return 0
