"""`herd bench MODEL`: prompt processing (pp) and decode (tg) tokens/s like llama-bench, against the bandwidth ceiling.

pp512 is one forward of 512 prompt tokens into an empty cache; tg128 is 128 single-token decode steps after
one token of context; both are what llama-bench's `-p 512 -n 128` time. The ceiling is decode's upper bound
on this machine: each new token reads every weight once (the token embedding only when it is also the tied
output projection), so tokens/s <= memory bandwidth / weight bytes. Bandwidth comes from a quick probe that
copies a buffer far larger than any cache. The measuring functions are reused by bench/side_by_side.py.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from ..engine.generate import decode_one, prefill
from ..model.cache import KVCache
from ._generation import add_dtype_flag, resolve_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure prompt-processing and decode speed (tokens/s) and the bandwidth ceiling")
    p.add_argument("model", help="a .gguf file, checkpoint folder or store name")
    p.add_argument("-p", "--prompt-tokens", type=int, default=512, help="prompt length of the pp test (default 512)")
    p.add_argument("-n", "--gen-tokens", type=int, default=128, help="decode steps of the tg test (default 128)")
    p.add_argument("-r", "--repeat", type=int, default=3, help="repetitions; the best is reported (default 3)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads); default torch's")
    add_dtype_flag(p, "the checkpoint's; float32 for GGUF")
    p.set_defaults(func=run)


# ---- measurements ------------------------------------------------------------------------------------------


def memory_bandwidth(mib: int = 512, repeat: int = 5) -> float:
    """Bytes/s of a large copy (read + write counted), best of `repeat`: the machine's streaming bandwidth."""
    n = mib * (1 << 20) // 4
    src, dst = torch.ones(n), torch.empty(n)
    dst.copy_(src)  # fault the pages in before timing
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best


def weight_bytes_per_token(net: nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter/buffer once, the input embedding only if tied.

    An untied input embedding is a lookup of one row per token, so its bytes do not count.
    """
    tied = bool(getattr(getattr(net, "config", None), "tie_embeddings", False))
    emb = getattr(net, "tok_embeddings", None)
    skip = set() if tied or emb is None else {id(t) for t in emb.parameters()} | {id(t) for t in emb.buffers()}
    seen, total = set(), 0
    for t in [*net.parameters(), *net.buffers()]:
        if id(t) in skip or t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _tokens(n: int, vocab: int) -> torch.Tensor:
    # Fixed ordinary ids (llama-bench uses random ones); content does not change the work done.
    return ((torch.arange(n) * 7919 + 100) % min(vocab, 32000)).reshape(1, n)


@torch.inference_mode()
def prompt_speed(net: nn.Module, n: int = 512, repeat: int = 3, dtype: torch.dtype = torch.float32) -> float:
    """Tokens/s of one prefill of n tokens into an empty cache (best of `repeat`)."""
    tokens = _tokens(n, net.config.vocab_size)
    best = float("inf")
    for _ in range(repeat):
        cache = KVCache.for_model(net.config, 1, n + 1, dtype=dtype)
        t = time.perf_counter()
        prefill(net, tokens, cache)
        best = min(best, time.perf_counter() - t)
    return n / best


@torch.inference_mode()
def decode_speed(net: nn.Module, n: int = 128, repeat: int = 3, dtype: torch.dtype = torch.float32) -> float:
    """Tokens/s of n single-token decode steps after one token of context (best of `repeat`)."""
    best = float("inf")
    for _ in range(repeat):
        cache = KVCache.for_model(net.config, 1, n + 2, dtype=dtype)
        logits = prefill(net, _tokens(1, net.config.vocab_size), cache)
        tok = logits.argmax(-1)
        t = time.perf_counter()
        for _ in range(n):
            tok = decode_one(net, tok, cache).argmax(-1)  # greedy: the sampler's cost is not the model's
        best = min(best, time.perf_counter() - t)
    return n / best


# ---- the verb ----------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from ..api import load
    from ..checkpoint.save import parse_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    model = load(resolve_model(args.model), dtype=parse_dtype(args.dtype))
    load_s = time.perf_counter() - t
    net = model.net.eval()
    act = next((p.dtype for p in net.parameters() if p.is_floating_point()), torch.float32)
    wbytes = weight_bytes_per_token(net)
    bw = memory_bandwidth()
    ceiling = bw / wbytes
    pp = prompt_speed(net, args.prompt_tokens, args.repeat, act)
    tg = decode_speed(net, args.gen_tokens, args.repeat, act)
    print(f"model: {args.model} (arch {model.config.arch})")
    print(f"threads: {torch.get_num_threads()}  dtype: {act}  load: {load_s:.1f} s")
    print(f"weights read per token: {wbytes / 1e6:.1f} MB   memory bandwidth (copy probe): {bw / 1e9:.1f} GB/s")
    print(f"{'test':>8} {'tokens/s':>10}")
    print(f"{'pp' + str(args.prompt_tokens):>8} {pp:10.1f}")
    print(f"{'tg' + str(args.gen_tokens):>8} {tg:10.1f}   ceiling {ceiling:.1f} tok/s, reached {tg / ceiling:.0%}")
    return 0
