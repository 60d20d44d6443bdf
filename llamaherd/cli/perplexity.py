"""`herd perplexity MODEL -f TEXT --num-ctx N`: perplexity and KL divergence as llama.cpp's llama-perplexity prints them."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ._generation import add_dtype_flag, load_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "perplexity", help="perplexity over a text file, and KL divergence against a base model (llama-perplexity)",
        description="Cut the text's tokens (BOS first) into non-overlapping chunks of --num-ctx tokens, score the "
        "second half of each chunk, and print llama-perplexity's 'Final estimate: PPL = X +/- Y' line. "
        "--kl-divergence-base FILE saves this model's top-k log-probabilities; --kl-divergence FILE compares "
        "this model against a saved base (mean KLD, percentiles, same top token, PPL ratio).",
    )
    p.add_argument("model", help="a .gguf file, checkpoint folder or store name")
    p.add_argument("-f", "--file", dest="text_file", help="the text file to evaluate (UTF-8); not needed with "
                   "--kl-divergence, whose base file holds the tokens")
    p.add_argument("-c", "--num-ctx", type=int, default=512,
                   help="tokens per chunk (default 512, llama-perplexity's -c); the flag other verbs use for the context")
    p.add_argument("--chunks", type=int, default=None, help="score at most this many chunks (default all)")
    p.add_argument("-b", "--batch-size", type=int, default=2048,
                   help="tokens per forward: batch-size / ctx chunks run together (default 2048)")
    p.add_argument("--kl-divergence-base", metavar="FILE", help="save the per-token log-probabilities (top-k) here")
    p.add_argument("--kl-divergence", metavar="FILE", help="compare against a base file saved by --kl-divergence-base")
    p.add_argument("--top-k", type=int, default=None, help="log-probabilities kept per token in the base file "
                   "(default 128)")
    add_dtype_flag(p, "the checkpoint's; float32 for GGUF")
    p.set_defaults(func=run)


def _progress(what: str):
    start = time.perf_counter()

    def show(done: int, total: int) -> None:
        rate = (time.perf_counter() - start) / done
        sys.stderr.write(f"\r{what}: [{done}/{total}] chunks, {rate:.2f} s/chunk, ETA {rate * (total - done):.0f} s ")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        from ..errors import LlamaherdError

        raise LlamaherdError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); convert it to UTF-8") from None


def run(args: argparse.Namespace) -> int:
    from ..errors import LlamaherdError
    from ..eval import compare, perplexity, save_base
    from ..eval.kld import TOP_K

    if args.kl_divergence and args.kl_divergence_base:
        raise LlamaherdError("give --kl-divergence-base (save a base) or --kl-divergence (compare to one), not both")
    if not args.kl_divergence and not args.text_file:
        raise LlamaherdError("no text: give the file to evaluate with -f TEXT")
    if args.num_ctx < 4 or args.batch_size < 1:
        raise LlamaherdError(f"--num-ctx {args.num_ctx} / --batch-size {args.batch_size}: both must be positive, ctx >= 4")
    text = _read_text(args.text_file) if args.text_file else None
    model, _ = load_model(args.model, args.dtype)
    if args.kl_divergence:
        cmp = compare(model, args.kl_divergence, batch_tokens=args.batch_size, progress=_progress("kl-divergence"))
        print(cmp.report())
        return 0
    if args.kl_divergence_base:  # one pass: the base file's NLLs are the perplexity's
        result = save_base(model, text, args.kl_divergence_base, args.num_ctx, top_k=args.top_k or TOP_K,
                           chunks=args.chunks, batch_tokens=args.batch_size, progress=_progress("perplexity"))
    else:
        result = perplexity(model, text, args.num_ctx, chunks=args.chunks, batch_tokens=args.batch_size,
                            progress=_progress("perplexity"))
    print(f"{result.n_chunks} chunks of {result.n_ctx} tokens, {result.count} tokens scored")
    print(result.final_line())
    if args.kl_divergence_base:
        print(f"saved the top-{args.top_k or TOP_K} log-probabilities of each scored token to {args.kl_divergence_base}")
    return 0
