"""`herd quantize SRC OUT --type q4_k_m|iq4_xs|...|int4-g64|fp8`: a quantized GGUF file, a weight-only int8/int4
folder, or a compressed-tensors FP8 folder."""

from __future__ import annotations

import argparse
import time

# GGUF file types (checkpoint/gguf_write.py FILE_TYPES), the default first
TYPES = ("q4_k_m", "q5_k_m", "q6_k", "q8_0", "q4_0", "q3_k_s", "q3_k_m", "q3_k_l", "iq4_xs", "f16", "f32")
# weight-only schemes (quant/weight_only.py `parse`), written as a saved folder (checkpoint/quantized.py)
WEIGHT_ONLY = ("int8", "int4", "int4-g32", "int4-g64", "int4-g128")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "quantize", help="quantize a checkpoint to GGUF (llama.cpp mixes) or to a weight-only int8/int4 folder",
        description="Read SRC (Meta folder, Hugging Face folder, .gguf file or store name) and write OUT. GGUF types "
        "write a file llama.cpp can run; the k-quant mixes give attn_v/ffn_down/output more bits as llama.cpp does. "
        "int8 / int4[-gN] write a folder of weight-only quantized projections that `herd run` and "
        "llamaherd.load() read without quantizing again; fp8 writes a compressed-tensors folder (vLLM, transformers). "
        "A quantized SRC is decoded and quantized again "
        "(with a warning: its rounding error stays).",
    )
    p.add_argument("src", help="checkpoint folder, .gguf file, or model name")
    p.add_argument("dst", help="output .gguf file (GGUF types) or folder (int8, int4[-gN])")
    p.add_argument("--type", dest="qtype", default="q4_k_m", choices=TYPES + WEIGHT_ONLY + ("fp8",),
                   help="GGUF file type (default q4_k_m), weight-only scheme (int4 groups of 128 unless -gN), or "
                        "fp8 (a compressed-tensors FP8 folder: e4m3 per channel, dynamic per-token activations)")
    p.add_argument("--imatrix", metavar="FILE", help="importance matrix from `herd imatrix` or llama-imatrix (.dat or "
                   ".gguf): weights each column's rounding error by its mean squared activation (GGUF types)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.qtype in WEIGHT_ONLY or args.qtype == "fp8":
        return _weight_only(args)
    from ..checkpoint.gguf_write import print_progress, write
    from ..api import resolve
    from ..checkpoint import read
    from ..checkpoint.save import check_complete

    start = time.perf_counter()
    im = None
    if args.imatrix:  # read first: a bad file fails before the checkpoint is read
        from ..quant import imatrix

        im = imatrix.read(args.imatrix)
    src = resolve(args.src)
    ckpt = read(src)
    check_complete(ckpt)
    out = write(ckpt, args.dst, qtype=args.qtype, progress=None if args.quiet else print_progress, imatrix=im)
    size = out.stat().st_size / 2**20
    used = f", imatrix of {len(im.entries)} entries" if im is not None else ""
    print(f"wrote {args.qtype} GGUF to {out} ({size:.1f} MiB, {time.perf_counter() - start:.1f} s{used})")
    return 0


def _weight_only(args: argparse.Namespace) -> int:
    """Load SRC with the weight-only (or FP8) swap and save it as checkpoint/quantized.py lays it out."""
    from ..api import load
    from ..checkpoint import quantized
    from ..quant.weight_only import QuantizeError

    if args.imatrix:
        raise QuantizeError("--imatrix weights GGUF block quantization; int8/int4/fp8 take no importance matrix")
    start = time.perf_counter()
    save = quantized.save_fp8 if args.qtype == "fp8" else quantized.save
    out = save(load(args.src, quantize=args.qtype), args.dst)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    kind = "compressed-tensors FP8" if args.qtype == "fp8" else f"{args.qtype} weight-only"
    print(f"wrote {kind} folder {out} ({size:.1f} MiB, {time.perf_counter() - start:.1f} s)")
    return 0
