"""Batched decode of the serving engine on a GGUF file: B sequences decoding together, side by side with llama.cpp.

Usage: .venv/bin/python bench/engine_decode.py [--gguf FILE] [--batches 1,4,8,16] [--prompt 32] [-n 32]
                                               [--threads 2] [--repeat 3]

For each batch size B, alternating in one run (so background load hits all three):
  - herd step: `engine.scheduler.Engine` (the paged cache of `herd serve`) with B greedy requests of `--prompt`
    tokens; after every prompt is in and has its first token, the next `-n` engine steps are timed, each one
    decode of all B rows (one-call native step over the paged cache, native/step.c) plus sampling;
  - herd per-module: the same with the one-call step switched off (`native.step.disabled()`);
  - llama.cpp: one context holding B sequences (llama-cpp-python's low-level API, as llama-batched-bench):
    the B prompts prefilled, then `-n` `llama_decode` calls of B tokens, one per sequence, logits of each.
Prints ms per decode step and generated tokens/s (B / step time) for each, the medians of `--repeat` runs,
and the ratios; then where a step of the one-call path goes (layers, vocabulary projection, the rest); the
load average at the start and end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import llamacpp  # noqa: E402
from llamaherd import load, resolve  # noqa: E402
from llamaherd.engine.sampling import SamplingParams  # noqa: E402
from llamaherd.engine.scheduler import Engine  # noqa: E402
from llamaherd.native import step as native_step  # noqa: E402
from llamaherd.store import DEFAULT_MODEL  # noqa: E402


def prompts(B: int, n: int) -> list[list[int]]:
    return [[int(100 + (7919 * (i + 1) * (j + 3)) % 20000) for j in range(n)] for i in range(B)]


class Split:
    """Time spent in the one-call step (every layer) and in the vocabulary projection during engine steps, by
    wrapping the two (`native.step.step`, the forward of the model's `project` module); the rest of a step is the final norm,
    sampling and the engine's own Python."""

    def __init__(self, net) -> None:
        self.layers = self.vocab = 0.0
        self.net, self._step = net, native_step.step

        def timed(fn, field):
            def run(*args, **kwargs):
                t = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    setattr(self, field, getattr(self, field) + time.perf_counter() - t)
            return run

        native_step.step = timed(self._step, "layers")
        self._project = net.project.forward  # a module: its instance's forward wrapped
        net.project.forward = timed(self._project, "vocab")

    def close(self) -> None:
        native_step.step = self._step
        del self.net.project.forward


def herd_step_ms(model, B: int, prompt: int, n: int, split: bool = False) -> float | tuple[float, float, float]:
    """Median ms of the engine's decode steps of B rows (each step: the batch forward and B samplings); with
    `split`, the mean ms of a step, of its layers and of its vocabulary projection instead."""
    engine = Engine(model.net, model.config, num_blocks=B * ((prompt + n + 2) // 16 + 2), block_size=16,
                    max_batch=B, prefill_chunk=prompt)
    params = SamplingParams(temperature=0.0, max_tokens=n + 2)
    for p in prompts(B, prompt):
        engine.submit(p, params, frozenset(), lambda _t: None)
    while engine.stats["peak_decode_batch"] < B:  # prompts in, every row decoding
        engine.step()
    parts = Split(model.net) if split else None
    times = []
    try:
        for _ in range(n):
            t = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t)
    finally:
        if parts is not None:
            parts.close()
    if parts is not None:
        return sum(times) / n * 1e3, parts.layers / n * 1e3, parts.vocab / n * 1e3
    return statistics.median(times) * 1e3


class LlamaCppBatch:
    """B sequences in one llama.cpp context, decoded one token each per `llama_decode`."""

    def __init__(self, path: Path, threads: int, max_batch: int, ctx_per_seq: int) -> None:
        import llama_cpp
        from llama_cpp import Llama

        self.capi = llama_cpp
        self.llm = Llama(str(path), n_threads=threads, n_ctx=64, verbose=False)  # the weights; a context of our own:
        p = llama_cpp.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch = max_batch * ctx_per_seq, 512, 512
        p.n_seq_max, p.kv_unified = max_batch, True  # one cache for every sequence, as llama-batched-bench -kvu
        p.n_threads = p.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.llm._model.model, p)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not make a context of B sequences")
        self.batch = llama_cpp.llama_batch_init(512, 0, max_batch)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        b = self.batch
        b.n_tokens = len(entries)
        for i, (tok, pos, seq, want) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
            b.seq_id[i][0] = seq
        if self.capi.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def step_ms(self, B: int, prompt: int, n: int) -> float:
        self.capi.llama_memory_clear(self.capi.llama_get_memory(self.ctx), True)
        for s, p in enumerate(prompts(B, prompt)):
            self._decode([(t, j, s, j == len(p) - 1) for j, t in enumerate(p)])
        times = []
        for i in range(n):
            t = time.perf_counter()
            self._decode([(100 + i, prompt + i, s, True) for s in range(B)])
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default=DEFAULT_MODEL, help=f"GGUF file or store name (default: {DEFAULT_MODEL})")
    ap.add_argument("--batches", default="1,4,8,16")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("-n", type=int, default=32, help="decode steps timed per run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# load average {os.getloadavg()}; command: {' '.join(sys.argv)}; {llamacpp.prepare()}", flush=True)
    path = resolve(args.gguf)
    model = load(path)
    batches = [int(b) for b in args.batches.split(",")]
    cpp = LlamaCppBatch(path, args.threads, max(batches), args.prompt + args.n + 4)
    rows = []
    for B in batches:
        runs: dict[str, list[float]] = {"step": [], "per-module": [], "llama.cpp": []}
        for _ in range(args.repeat):
            runs["step"].append(herd_step_ms(model, B, args.prompt, args.n))
            with native_step.disabled():
                runs["per-module"].append(herd_step_ms(model, B, args.prompt, args.n))
            runs["llama.cpp"].append(cpp.step_ms(B, args.prompt, args.n))
            print(f"# B={B}: " + ", ".join(f"{k} {v[-1]:.2f} ms" for k, v in runs.items())
                  + f" (load average {os.getloadavg()[0]:.1f})", flush=True)
        rows.append((B, *(statistics.median(runs[k]) for k in runs)))
    print(f"\n{Path(path).name}, {args.threads} threads, prompt {args.prompt}, median of {args.repeat} runs of "
          f"{args.n} steps (ms per decode step of B rows; tokens/s = B / step)")
    print("| B | herd step ms | tok/s | per-module ms | tok/s | llama.cpp ms | tok/s | step vs per-module | "
          "step vs llama.cpp |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for B, s, m, c in rows:
        print(f"| {B} | {s:.2f} | {B / s * 1e3:.1f} | {m:.2f} | {B / m * 1e3:.1f} | {c:.2f} | {B / c * 1e3:.1f} | "
              f"{m / s:.2f}x | {c / s:.2f}x |")
    print("\nWhere a step of the one-call path goes (mean of one more run of each B):")
    print("| B | step ms | layers (lh_step_decode) | vocabulary projection | norm, sampling, engine |")
    print("|---:|---:|---:|---:|---:|")
    for B in batches:
        total, layers, vocab = herd_step_ms(model, B, args.prompt, args.n, split=True)
        print(f"| {B} | {total:.2f} | {layers:.2f} | {vocab:.2f} | {total - layers - vocab:.2f} |")
    print(f"# load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
