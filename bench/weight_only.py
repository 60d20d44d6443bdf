"""Weight-only int8/int4 decode against our bf16 decode, side by side in one process, plus each one's KLD to bf16.

    python bench/make_llama1b.py                     # the Llama-3.2-1B-shaped random-weight HF folder
    python bench/weight_only.py [--model DIR] [--steps 32] [--rounds 3] [--threads N] [--schemes int8,int4,int4/f32]

For each of bf16, int8, int4 (group 128) and int4-g32: decode milliseconds per token (batch 1, one token per
step through the KV cache after a short prompt; the best of `rounds` medians, the schemes interleaved round by
round so that load on the machine hits them alike), the bytes of weights one token reads, and the decode rate
that the measured memory bandwidth allows for those bytes (the ceiling: decode reads every weight once per
token). A scheme written `int8/f32` runs with float32 activations (`native.weight_only.INT16_ACTIVATIONS`
off: the exact products of the dequantised weights) instead of the default integer activations; `int8/a8` or
`int4/a8` with int8 activations per 32 elements (`native.weight_only.INT8_ACTIVATIONS` on), `int8/a16` or
`int4/a16` with int16 ones per row (off), whatever the module's default; one written
`int8/module` (and `bf16/module`) runs the per-module native path (`native.step.disabled()`) instead of the
one-call decode step; `--ab` adds the `/module` twin of every scheme, bf16 included, so the step's gain and
the ratios before and after it come from one run. Each scheme's speedup is over bf16 on the same path. KLD: mean over positions of KL(bf16 || scheme) on the full-vocabulary float32 logits of one random
token sequence (torch's `kl_div`); random weights make it a check of the codes, not a prediction for a trained
model.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch
import torch.nn.functional as F

import llamaherd
from llamaherd import native
from llamaherd.engine.generate import decode_one, prefill
from llamaherd.model.cache import KVCache
from llamaherd.native import step
from llamaherd.native import weight_only as native_wo

DEFAULT_MODEL = "/tmp/llamaherd-bench/llama-3.2-1b-random/hf-bf16"
PROMPT = [128000, 791, 4062, 14198, 39935, 35308, 927, 279, 16053, 5679, 13]


@torch.inference_mode()
def decode_ms(net, config, steps: int) -> float:
    """Median milliseconds of one decode step (batch 1) over `steps` steps after the prompt."""
    prompt = [t % config.vocab_size for t in PROMPT]  # the ids as they are for a Llama 3 vocabulary
    cache = KVCache.for_model(config, 1, len(prompt) + steps + 1, dtype=torch.bfloat16)  # as the engine does
    tok = prefill(net, torch.tensor([prompt]), cache).argmax(-1)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        tok = decode_one(net, tok, cache).argmax(-1)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def weight_bytes_per_token(net) -> int:
    """Bytes of parameters one decode step reads: every matrix once, one row of the embedding table."""
    sd = net.state_dict()
    quantized_output = any(k.startswith("project.") for k in sd)
    total = 0
    for name, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if name == "tok_embeddings.weight":  # one row; all of it when it is also the (float) output matrix
            total += nbytes if net.config.tie_embeddings and not quantized_output else t.shape[1] * t.element_size()
        elif not (name == "output.weight" and quantized_output):  # a float copy the quantized projection skips
            total += nbytes
    return total


def bandwidth_gbs(n_bytes: int = 1 << 30, rounds: int = 5) -> float:
    """Read bandwidth as torch sees it: the best of `rounds` sums over a buffer far larger than the caches."""
    buf = torch.ones(n_bytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
    return n_bytes / best / 1e9


@torch.inference_mode()
def kld(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions of KL(P_ref || P) on the full vocabulary."""
    return float(F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref_logits, -1), log_target=True,
                          reduction="none").sum(-1).mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kld-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--schemes", default="int8,int4,int4-g32", help="comma-separated quantize= values beside bf16")
    ap.add_argument("--ab", action="store_true", help="every scheme also on the per-module path (X/module)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {args.model}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average at start {os.getloadavg()[0]:.2f}")
    schemes = ["bf16", *[s for s in args.schemes.split(",") if s]]
    if args.ab:
        schemes = [v for s in schemes for v in (s, f"{s}/module")]
    models = {}
    for spec in schemes:
        t = time.perf_counter()
        base = spec.split("/")[0]
        same = next((m for s, m in models.items() if s.split("/")[0] == base), None)
        models[spec] = same or llamaherd.load(args.model, dtype=torch.bfloat16,
                                              quantize=None if base == "bf16" else base)
        print(f"# loaded {spec} in {time.perf_counter() - t:.1f} s", flush=True)

    def activations(spec):
        """The INT16_ACTIVATIONS / INT8_ACTIVATIONS settings and the decode path a scheme runs under."""
        stack = contextlib.ExitStack()
        if "/f32" in spec:
            stack.enter_context(native.switched_off(native_wo, "INT16_ACTIVATIONS"))
        for tag, on in (("/a8", True), ("/a16", False)):
            if tag in spec:
                before = native_wo.INT8_ACTIVATIONS
                native_wo.INT8_ACTIVATIONS = on
                stack.callback(setattr, native_wo, "INT8_ACTIVATIONS", before)
        if "/module" in spec:
            stack.enter_context(step.disabled())
        return stack
    gbs = bandwidth_gbs()
    print(f"# measured read bandwidth {gbs:.1f} GB/s")

    times: dict = {spec: [] for spec in schemes}
    for _ in range(args.rounds):
        for spec, m in models.items():
            with activations(spec):
                times[spec].append(decode_ms(m.net, m.config, args.steps))

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, models["bf16"].config.vocab_size, (args.kld_tokens,), generator=g).tolist()
    ref = models["bf16"].logits(ids)
    print(f"{'scheme':12s} {'ms/token':>9s} {'tok/s':>7s} {'speedup':>8s} {'weights MB':>11s} "
          f"{'ceiling tok/s':>14s} {'KLD vs bf16':>12s}")
    for spec, m in models.items():
        ms = min(times[spec])
        base_ms = min(times["bf16/module" if "/module" in spec else "bf16"])  # bf16 on the same path
        nbytes = weight_bytes_per_token(m.net)
        with activations(spec):
            div = 0.0 if spec.split("/")[0] == "bf16" or "/module" in spec else kld(ref, m.logits(ids))
        print(f"{spec:12s} {ms:9.2f} {1e3 / ms:7.1f} {base_ms / ms:7.2f}x {nbytes / 1e6:11.0f} "
              f"{gbs * 1e9 / nbytes:14.1f} {div:12.5f}")
    print(f"# load average at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
