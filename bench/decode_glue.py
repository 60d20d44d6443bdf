"""Decode ms/token with the native per-layer glue (llamaherd/native/ops.py, swapped in by native/swaps.py) on
and off, in one process.

  .venv/bin/python bench/decode_glue.py gemma-3-270m-q4_k_m --threads 1 --rounds 5 -n 64 [--prefill 512]
  .venv/bin/python bench/decode_glue.py --micro --threads 1     # the single ops, torch vs native, in us

Rounds alternate on/off (the matrix kernels stay on in both), each round a fresh cache: prefill a short
prompt, then n greedy decode steps timed together. Prints the median ms/token of each side, and how far the
two sides' logits are apart on the first steps (same tokens fed to both), with float activations into the
quantized products: with int8 activations (the default) an ulp-level change in a norm can flip the rounding of
an activation code, so that gap measures the int8 rounding's sensitivity rather than the glue's accuracy.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamaherd import load  # noqa: E402
from llamaherd.engine.generate import decode_one, prefill  # noqa: E402
from llamaherd.model.cache import KVCache  # noqa: E402
from llamaherd.native import ops  # noqa: E402
from llamaherd.native import ggml_kernels  # noqa: E402

PROMPT = [2, 651, 6037, 576, 6081, 603]  # a few ids valid in every vocabulary here


@torch.inference_mode()
def prefill_ms(net, dtype, T: int) -> float:
    ids = torch.randint(10, 1000, (1, T), generator=torch.Generator().manual_seed(0))
    cache = KVCache.for_model(net.config, 1, T + 1, dtype=dtype)
    t = time.perf_counter()
    prefill(net, ids, cache)
    return (time.perf_counter() - t) * 1e3


@torch.inference_mode()
def micro() -> None:
    """Best-of-5 microseconds per call of each glue op on Gemma 270M / Llama 1B shapes, torch vs native."""
    from llamaherd.model import gemma3, llama
    from llamaherd.model.rope import Rotary
    from llamaherd.native.swaps import native_module

    def best_us(f, n: int) -> float:
        f()
        times = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(n):
                f()
            times.append((time.perf_counter() - t) / n * 1e6)
        return min(times)

    cases = []
    for shape in [(1, 1, 640), (1, 1, 4, 256), (1, 512, 640), (1, 512, 4, 256), (1, 1, 2048), (1, 512, 2048)]:
        for cls in (llama.RMSNorm, gemma3.GemmaRMSNorm):
            cases.append((f"{cls.__name__}{shape}", cls(shape[-1]), (torch.randn(shape),), shape[1]))
    for T, H, D in [(512, 4, 256), (512, 32, 64)]:
        cos, sin = torch.randn(1, T, D // 2), torch.randn(1, T, D // 2)
        cases.append((f"RotaryHalves{(1, T, H, D)}", gemma3.RotaryHalves(), (torch.randn(1, T, H, D), cos, sin), T))
        cases.append((f"Rotary{(1, T, H, D)}", Rotary(), (torch.randn(1, T, H, D), cos, sin), T))
    for name, reference, args, T in cases:
        n = 2000 if T == 1 else 50
        fast = native_module(reference)
        on = best_us(lambda: fast(*args), n)
        off = best_us(lambda: reference(*args), n)
        print(f"{name:34s} torch {off:8.1f} us   native {on:8.1f} us")


@torch.inference_mode()
def decode_ms(net, dtype, n: int) -> float:
    cache = KVCache.for_model(net.config, 1, len(PROMPT) + n + 1, dtype=dtype)
    tok = prefill(net, torch.tensor([PROMPT]), cache).argmax(-1)
    t = time.perf_counter()
    for _ in range(n):
        tok = decode_one(net, tok, cache).argmax(-1)
    return (time.perf_counter() - t) / n * 1e3


@contextlib.contextmanager
def glue(net, on: bool, nudge: bool = False):
    """Glue on or off; `nudge` moves every norm's input up by one ulp (a control for rounding sensitivity)."""
    hooks = []
    if nudge:
        for m in net.modules():
            if type(m).__name__.endswith("RMSNorm"):
                hooks.append(m.register_forward_pre_hook(lambda _, a: (torch.nextafter(a[0], a[0] + 1),)))
    ops.ENABLED = on
    try:
        yield
    finally:
        ops.ENABLED = True
        for h in hooks:
            h.remove()


@torch.inference_mode()
def logits_gap(net, dtype, a: dict, b: dict, n: int = 8) -> float:
    """Max |logit difference| between two settings of `glue` over n teacher-forced decode steps (a's tokens)."""
    caches = [KVCache.for_model(net.config, 1, len(PROMPT) + n + 1, dtype=dtype) for _ in (a, b)]
    tok, gap = None, 0.0
    for step in range(n + 1):
        outs = []
        for setting, cache in zip((a, b), caches):
            with glue(net, **setting):
                outs.append(prefill(net, torch.tensor([PROMPT]), cache) if step == 0 else decode_one(net, tok, cache))
        gap = max(gap, float((outs[0] - outs[1]).abs().max()))
        tok = outs[0].argmax(-1)
    return gap


@torch.inference_mode()
def decode_logits_scale(net, dtype) -> torch.Tensor:
    cache = KVCache.for_model(net.config, 1, len(PROMPT) + 1, dtype=dtype)
    return prefill(net, torch.tensor([PROMPT]), cache).abs().max()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--micro", action="store_true", help="time the single ops instead of a model")
    ap.add_argument("--prefill", type=int, default=0, help="also time a prefill of this many tokens per round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-n", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    if args.micro:
        micro()
        return 0
    net = load(args.model).net.eval()
    dtype = next(p.dtype for p in net.parameters() if p.is_floating_point())
    scale = float(decode_logits_scale(net, dtype))
    for int8 in (False, True):
        before, ggml_kernels.INT8_ACTIVATIONS = ggml_kernels.INT8_ACTIVATIONS, int8
        gap = logits_gap(net, dtype, {"on": True}, {"on": False})
        control = logits_gap(net, dtype, {"on": False}, {"on": False, "nudge": True})
        ggml_kernels.INT8_ACTIVATIONS = before
        print(f"{'int8' if int8 else 'float'} activations, max |logit gap| over 8 steps (max |logit| {scale:.3g}): "
              f"glue on vs off {gap:.3g}; control, torch glue vs norm inputs nudged by one ulp {control:.3g}")
    decode_ms(net, dtype, 4)  # warm up both sides
    times: dict[bool, list[float]] = {True: [], False: []}
    prefills: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for on in (False, True):
            ops.ENABLED = on
            times[on].append(decode_ms(net, dtype, args.n))
            if args.prefill:
                prefills[on].append(prefill_ms(net, dtype, args.prefill))
    ops.ENABLED = True
    for on in (False, True):
        print(f"glue {'native' if on else 'torch '}: decode median {statistics.median(times[on]):.2f} ms/token  "
              f"rounds {' '.join(f'{t:.2f}' for t in times[on])}")
        if args.prefill:
            print(f"             prefill {args.prefill}: median {statistics.median(prefills[on]):.1f} ms  "
                  f"rounds {' '.join(f'{t:.1f}' for t in prefills[on])}")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
