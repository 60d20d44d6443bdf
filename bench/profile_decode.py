"""Where a decode step's time goes: the one-call step (native/step.py) against the per-module path, by component.

  .venv/bin/python bench/profile_decode.py gemma-3-270m-q4_k_m --threads 1 -n 64 --rounds 5
  .venv/bin/python bench/profile_decode.py MODEL --cprofile     # cProfile + torch.profiler of the step as it runs
  .venv/bin/python bench/profile_decode.py HF_FOLDER --dtype bfloat16 [--quantize int8|int4] -n 32 --rounds 5

Default report, in one process: (1) A/B of whole decode steps, rounds alternating the per-module path
(`native.step.disabled()`) and the one-call step, median ms/token of each; (2) the one-call step's components,
median over the steps: embedding lookup, `lh_step_decode` (every layer), final norm + vocabulary projection,
argmax; (3) the layers' products alone, each group as its own native call as the per-module path makes them
(wq/wk/wv, wo, w1/w3, w2) and the vocabulary projection: what the kernels need without any glue. The load
average is printed before and after, and both paths as a share of the copy-probe ceiling (`herd bench`'s
memory bandwidth over the weight bytes a token reads).
"""

from __future__ import annotations

import argparse
import ctypes
import cProfile
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamaherd import load  # noqa: E402
from llamaherd.cli.bench import memory_bandwidth, weight_bytes_per_token  # noqa: E402
from llamaherd.engine.generate import decode_one, prefill  # noqa: E402
from llamaherd.model.cache import KVCache  # noqa: E402
from llamaherd.native import ggml_kernels, step  # noqa: E402


def steps(net, n: int, dtype) -> float:
    """ms per greedy decode step over n steps after a one-token prompt."""
    with torch.inference_mode():
        cache = KVCache.for_model(net.config, 1, n + 2, dtype=dtype)
        tok = prefill(net, torch.tensor([[2]]), cache).argmax(-1)
        t = time.perf_counter()
        for _ in range(n):
            tok = decode_one(net, tok, cache).argmax(-1)
        return (time.perf_counter() - t) / n * 1e3


def components(net, n: int, dtype) -> dict[str, float]:
    """Median ms of each part of the one-call step (what `_Step.forward` runs, timed piece by piece)."""
    plan = step._plan(net)
    if plan is None:
        raise SystemExit("the one-call step does not apply to this model")
    parts: dict[str, list[float]] = {"embedding + lh_step_decode": [], "of which lh_step_decode": [],
                                     "final norm + vocabulary projection": [], "argmax": []}
    with torch.inference_mode():
        cache = KVCache.for_model(net.config, 1, n + 2, dtype=dtype)
        tok = prefill(net, torch.tensor([[2]]), cache).argmax(-1)
        fn = step._fn("lh_step_decode")
        for _ in range(n):
            t0 = time.perf_counter()
            h = step.step(net, plan, tok[:, None], None, cache, None)
            t1 = time.perf_counter()
            logits = net.project(net.norm(h), net.output_weight())[:, -1]
            t2 = time.perf_counter()
            tok = logits.argmax(-1)
            t3 = time.perf_counter()
            # lh_step_decode alone, on a scratch copy of the cache slot just written (same work, same slot)
            cache.length -= 1
            hh = h.reshape(1, -1).float()
            pos = torch.tensor([cache.length])
            where = ctypes.byref(step._cache_rows(cache, None)(0))
            t4 = time.perf_counter()
            fn(plan.ref, hh.data_ptr(), 1, pos.data_ptr(), where, torch.get_num_threads())
            t5 = time.perf_counter()
            cache.length += 1
            for key, dt in zip(parts, (t1 - t0, t5 - t4, t2 - t1, t3 - t2)):
                parts[key].append(dt * 1e3)
    return {k: statistics.median(v) for k, v in parts.items()}


def products_alone(net, n: int) -> dict[str, float]:
    """Median ms per token of the layers' products as separate native calls (the kernels with no glue; packed
    GGUF weights, empty for other models)."""
    if getattr(net.layers[0].attention.wq, "qtype", None) is None:
        return {}
    x = torch.randn(1, net.config.dim)
    groups = {"wq/wk/wv": ("attention", ("wq", "wk", "wv")), "wo": ("attention", ("wo",)),
              "w1/w3": ("feed_forward", ("w1", "w3")), "w2": ("feed_forward", ("w2",))}
    times: dict[str, list[float]] = {k: [] for k in [*groups, "vocabulary"]}
    args = {}
    for key, (owner, names) in groups.items():
        args[key] = []
        for layer in net.layers:
            mods = [getattr(getattr(layer, owner), name) for name in names]
            k_in = mods[0].in_features
            weights = ggml_kernels.Weights([(m.weight.plain(), m.qtype.id) for m in mods])
            args[key].append((torch.randn(1, k_in), weights, k_in))
    with torch.inference_mode():
        for _ in range(n):
            for key in groups:
                t = time.perf_counter()
                for xi, w, k_in in args[key]:
                    ggml_kernels.gemv_many(xi, w, k_in)
                times[key].append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            net.project(x[:, None], net.output_weight())
            times["vocabulary"].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--quantize", default=None, help="weight-only int8 / int4[-gN] at load (llamaherd.load)")
    ap.add_argument("--cprofile", action="store_true", help="cProfile and torch.profiler of the steps instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    net = load(args.model, dtype=getattr(torch, args.dtype) if args.dtype else None, quantize=args.quantize).net.eval()
    dtype = next(p.dtype for p in net.parameters() if p.is_floating_point())
    print(f"load average {os.getloadavg()[0]:.2f}; {args.model}, {args.threads} thread(s), one-call step "
          f"{'applies' if step._plan(net) is not None else 'does NOT apply'}")
    steps(net, 4, dtype)
    if args.cprofile:
        prof = cProfile.Profile()
        prof.enable()
        steps(net, args.n, dtype)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(14)
        with torch.profiler.profile() as tp:
            steps(net, 8, dtype)
        print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
        return 0
    per_module, one_call = [], []
    for _ in range(args.rounds):
        with step.disabled():
            per_module.append(steps(net, args.n, dtype))
        one_call.append(steps(net, args.n, dtype))
    a, b = statistics.median(per_module), statistics.median(one_call)
    print(f"per-module path {a:.2f} ms/token, one-call step {b:.2f} ms/token (median of {args.rounds}): {a / b:.2f}x")
    ceiling = memory_bandwidth() / weight_bytes_per_token(net)  # tokens/s the copy probe allows (`herd bench`)
    print(f"copy-probe ceiling {ceiling:.1f} tok/s: per-module {1e3 / a / ceiling:.0%}, one-call {1e3 / b / ceiling:.0%}")
    print("rounds per-module", " ".join(f"{v:.2f}" for v in per_module),
          "| one-call", " ".join(f"{v:.2f}" for v in one_call))
    if step._plan(net) is not None:
        print("\none-call step, median ms per token:")
        for k, v in components(net, args.n, dtype).items():
            print(f"  {k:40s} {v:7.3f}")
        alone = products_alone(net, max(8, args.n // 4))
        print("\nproducts alone (separate native calls, as the per-module path makes them), ms per token:"
              if alone else "\n(products alone: GGUF weights only)")
        for k, v in alone.items():
            print(f"  {k:40s} {v:7.3f}")
        if alone:
            print(f"  {'sum':40s} {sum(alone.values()):7.3f}")
    print(f"load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
