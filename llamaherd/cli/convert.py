"""`herd convert SRC DST --to hf|meta|gguf`: rewrite a checkpoint in another format."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a checkpoint between Meta, Hugging Face and GGUF formats",
        description="Read SRC (Meta folder, Hugging Face folder, .gguf file or store name) and write DST.",
    )
    p.add_argument("src", help="checkpoint folder, .gguf file, or model name")
    p.add_argument("dst", help="output folder (meta, hf) or .gguf file")
    p.add_argument("--to", dest="fmt", required=True, choices=("hf", "meta", "gguf"), help="output format")
    p.add_argument("--shards", type=int, default=1, help="meta: number of model-parallel consolidated.NN.pth files")
    p.add_argument("--dtype", default=None, help="cast weights first: f32, f16, bf16 (gguf: passed to its writer)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="hf: largest safetensors file, in GiB")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..api import resolve
    from ..checkpoint import read
    from ..checkpoint.save import save

    from ..errors import CheckpointError

    if args.shards != 1 and args.fmt != "meta":
        raise CheckpointError(args.dst, f"--shards applies to --to meta only (got --to {args.fmt}); drop it")
    ckpt = read(resolve(args.src))
    options: dict = {}
    if args.fmt == "meta":
        options["shards"] = args.shards
    elif args.fmt == "hf":
        options["max_shard_bytes"] = int(args.max_shard_gb * 2**30)
    out = save(ckpt, args.dst, args.fmt, dtype=args.dtype, **options)
    print(f"wrote {args.fmt} checkpoint to {out}")
    return 0
