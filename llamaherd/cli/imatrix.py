"""`herd imatrix MODEL -f TEXT -o imatrix.dat`: collect an importance matrix as llama.cpp's llama-imatrix does."""

from __future__ import annotations

import argparse
import sys
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "imatrix", help="collect an importance matrix for `herd quantize --imatrix` (llama-imatrix)",
        description="Run the model over the text in chunks of --ctx tokens (BOS first, as llama-imatrix) and record, "
        "for every matrix of the transformer blocks (each expert apart), the sum of squared inputs per column "
        "and the tokens counted. Writes llama.cpp's legacy .dat layout, or its GGUF imatrix when the output "
        "name ends in .gguf; llama-quantize reads both, and so does `herd quantize --imatrix`.",
    )
    p.add_argument("model", help="a .gguf file, checkpoint folder or store name")
    p.add_argument("-f", "--file", dest="text_file", required=True, help="calibration text (UTF-8)")
    p.add_argument("-o", "--output", default="imatrix.dat", help="output file (default imatrix.dat)")
    p.add_argument("--output-format", choices=("dat", "gguf"), default=None,
                   help="file layout (default: gguf for a .gguf name, else dat)")
    p.add_argument("-c", "--ctx", type=int, default=512, help="tokens per chunk (default 512, llama-imatrix's -c)")
    p.add_argument("--chunks", type=int, default=None, help="process at most this many chunks (default all)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    from ._generation import add_dtype_flag

    add_dtype_flag(p, "the checkpoint's; float32 for GGUF")
    p.set_defaults(func=run)


def collector_for(model, im):
    """Hooks on every `blk.*` matrix of `model` (a llamaherd.Model), named as GGUF names them."""
    from ..checkpoint.gguf_write import gguf_name
    from ..errors import CheckpointError
    from ..model.moe import Experts
    from ..quant.imatrix import Collector

    arch = model.checkpoint.config.arch
    linears, experts = {}, {}
    for name, mod in model.net.named_modules():
        if not name.startswith("layers."):
            continue
        if isinstance(mod, Experts):
            experts[mod] = tuple(gguf_name(f"{name}.{p}", arch)[0]
                                 for p in ("moe_w_in_eD_F", "moe_w_swiglu_eD_F", "moe_w_out_eF_D"))
            continue
        w = mod._parameters.get("weight")
        w = mod._buffers.get("weight") if w is None else w
        if w is None or w.dim() != 2:
            continue
        try:
            gname = gguf_name(f"{name}.weight", arch)[0]
        except CheckpointError:  # a module the GGUF file does not hold as a matrix
            continue
        if gname.startswith("blk."):
            linears[gname] = mod
    return Collector(im, linears, experts)


def without_logits(net):
    """A shallow copy of `net` sharing every layer whose vocabulary projection computes nothing: the statistics
    need the blocks' inputs only (llama-imatrix leaves output.weight out unless --process-output)."""
    import copy

    from torch import nn

    class NoLogits(nn.Module):
        def forward(self, h, weight):
            return h[:, :0, :0]

    view = copy.copy(net)
    view._modules = dict(net._modules)  # a new module table: `net` keeps its projection
    view._modules["project"] = NoLogits()
    return view


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import native
    from ..errors import LlamaherdError
    from ..eval.perplexity import chunk_tokens, encode_text
    from ..quant import imatrix
    from ._generation import load_model
    from .perplexity import _read_text

    if args.ctx < 16:  # llama-imatrix ignores products of fewer than 16 tokens
        raise LlamaherdError(f"--ctx {args.ctx}: llama-imatrix counts products of 16 tokens or more; give --ctx >= 16")
    text = _read_text(args.text_file)
    with native.disabled():  # the reference modules, whose inputs the hooks see
        model, _ = load_model(args.model, args.dtype)
    tokens = encode_text(model, text)
    grid = chunk_tokens(tokens, args.ctx, model.tokenizer.bos_id, args.chunks)
    im = imatrix.IMatrix(chunk_size=args.ctx, chunks=grid.shape[0], datasets=[args.text_file])
    collector = collector_for(model, im)
    view = without_logits(model.net)
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for i in range(grid.shape[0]):
                view(grid[i : i + 1])
                if not args.quiet:
                    rate = (time.perf_counter() - start) / (i + 1)
                    sys.stderr.write(f"\rimatrix: [{i + 1}/{grid.shape[0]}] chunks, {rate:.2f} s/chunk ")
                    sys.stderr.flush()
    finally:
        collector.close()
    if not args.quiet:
        sys.stderr.write("\n")
    fmt = args.output_format or ("gguf" if args.output.endswith(".gguf") else "dat")
    out = (imatrix.write_gguf if fmt == "gguf" else imatrix.write_dat)(im, args.output)
    print(f"wrote {len(im.entries)} entries from {grid.shape[0]} chunks of {args.ctx} tokens to {out} ({fmt})")
    return 0
