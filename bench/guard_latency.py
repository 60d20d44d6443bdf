"""The latency a Llama Guard shield adds per request, llamaherd and llama.cpp side by side in ONE run.

No Llama Guard weights ship with the package, so the default model (Gemma 3 270M, Q4_K_M GGUF) stands in as a
guard-shaped model: each check is a Llama Guard 3 8B prompt (the real template text, tokenized by the default
model's tokenizer) prefilled, then 5 greedy tokens (the length of "\\n\\nunsafe\\nS1"), exactly the work
`LlamaGuard.answer` does (llamaherd: `greedy_answer`, the same function; llama.cpp: `Llama.eval` on the same ids).
An input shield checks the conversation up to the user turn; an output shield checks it with the reply. For
scale, the request itself (the user turn prefilled, 64 greedy reply tokens) is timed on llamaherd too.
Prints p50/p95 over --requests conversations and the load average. llama.cpp runs in a child process (same
ids, same threads, after llamaherd's runs), so a crash there is reported instead of ending the benchmark.
With --concurrent K, K input checks arriving at once are timed three ways, latency from arrival p50/p95: one
after another on the reference path above (a guard behind a lock: the k-th waits for the k-1 before it), one
after another on `BatchedLlamaGuard`'s continuous-batching engine (what `herd serve --guard` runs; its prefix
cache keeps the shared template prefix after the first check), and all submitted together to that engine.

  .venv/bin/python bench/guard_latency.py --threads 2 --requests 20 --concurrent 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamaherd import load, resolve  # noqa: E402
from llamaherd.guard.llama_guard import greedy_answer  # noqa: E402
from llamaherd.guard.prompt import release, render_text  # noqa: E402
from llamaherd.store import DEFAULT_MODEL  # noqa: E402

ANSWER_TOKENS = 5
REPLY_TOKENS = 64
SENTENCES = ("How do I bake sourdough bread at home with a stiff starter?", "My landlord will not return the deposit.",
             "Explain how vaccines train the immune system.", "Write a limerick about a cat who owns a bakery.",
             "What are the side effects of ibuprofen when taken daily?")
REPLY = ("Sure. Start by feeding the starter twelve hours ahead, mix flour and water, rest for an hour, add salt, "
         "fold every half hour for three hours, shape, proof overnight in the fridge, and bake covered at 250 C "
         "for twenty minutes, then uncovered until deep brown. ") * 2


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def conversations(n: int) -> list[list[dict]]:
    out = []
    for i in range(n):
        user = " ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(1 + i % 4))
        out.append([{"role": "user", "content": user}, {"role": "assistant", "content": REPLY}])
    return out


def llamacpp_times(path, threads: int, jobs) -> tuple[list[float], list[float]] | None:
    """The same checks on llama.cpp, in a child process; None (and the reason printed) if it fails."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"path": str(path), "threads": threads, "jobs": jobs}, f)
    try:
        run = subprocess.run([sys.executable, __file__, "--llamacpp-child", f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if run.returncode != 0:
        import signal

        why = (f"killed by {signal.Signals(-run.returncode).name}" if run.returncode < 0 else
               f"exited with status {run.returncode}")
        print(f"llama.cpp child {why}; its last stderr line: {run.stderr.strip().splitlines()[-1:]}")
        return None
    got = json.loads(run.stdout.strip().splitlines()[-1])
    return got["in"], got["out"]


def llamacpp_child(job_file: str) -> int:
    from bench.llamacpp import prepare

    print(prepare(), file=sys.stderr)  # before llama_cpp.Llama is built: its AMX repacking crashes here
    from llama_cpp import Llama

    spec = json.loads(Path(job_file).read_text())
    llm = Llama(spec["path"], n_threads=spec["threads"], n_threads_batch=spec["threads"], n_ctx=2048, n_batch=512,
                n_ubatch=512, verbose=False)

    def check(ids: list[int]) -> float:
        t = time.perf_counter()
        llm.reset()
        llm.eval(ids)
        for _ in range(ANSWER_TOKENS - 1):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        return time.perf_counter() - t

    check(spec["jobs"][0][0])  # warm-up
    out = {"in": [], "out": []}
    for ids_in, ids_out in spec["jobs"]:
        out["in"].append(check(ids_in))
        out["out"].append(check(ids_out))
    print(json.dumps(out))
    return 0


def concurrent_times(model, checks: list[list[int]], herd_check) -> dict[str, list[float]]:
    """Latency from arrival of checks that all arrive at t=0: one after another on the reference path and on
    the engine, and together on the engine."""
    import threading

    from llamaherd.engine.sampling import SamplingParams
    from llamaherd.guard import LlamaGuard
    from llamaherd.guard.batched import BatchedLlamaGuard

    serial, elapsed = [], 0.0
    for ids in checks:
        elapsed += herd_check(ids)
        serial.append(elapsed)
    guard = BatchedLlamaGuard(LlamaGuard(model, "llama-guard-3-8b"), max_batch=len(checks))
    # The serial runs' work exactly: ANSWER_TOKENS greedy tokens, the stand-in model's end tokens ignored.
    guard.params = SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0, logprobs=True, top_logprobs=20,
                                  ignore_eos=True)
    guard.stop_ids = frozenset()
    guard.answer(checks[0])  # warm-up
    engine_serial, elapsed = [], 0.0
    for ids in checks:
        t = time.perf_counter()
        guard.answer(ids)
        elapsed += time.perf_counter() - t
        engine_serial.append(elapsed)
    batched = [0.0] * len(checks)
    start = threading.Barrier(len(checks) + 1)

    def one(i: int) -> None:
        start.wait()
        guard.answer(checks[i])
        batched[i] = time.perf_counter() - t0

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(checks))]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    guard.close()
    print(f"engine: peak decode batch {guard.engine.stats['peak_decode_batch']}, prompt tokens "
          f"{guard.engine.stats['prompt_tokens']}, of which from the prefix cache "
          f"{guard.engine.stats['prefix_hit_tokens']}")
    return {"one after another, reference path": serial, "one after another, engine": engine_serial,
            "together, engine": batched}


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--llamacpp-child":
        return llamacpp_child(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--concurrent", type=int, default=4, help="input checks arriving at once (0: skip)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve(args.model)
    model = load(path)
    tok = model.tokenizer
    rel = release("llama-guard-3-8b")

    def guard_ids(convo: list[dict]) -> list[int]:
        return tok.encode(render_text(rel, convo), bos=True)

    def herd_check(ids: list[int]) -> float:
        t = time.perf_counter()
        greedy_answer(model, ids, ANSWER_TOKENS, frozenset(), 0)
        return time.perf_counter() - t

    def herd_request(convo: list[dict]) -> float:
        ids = tok.encode(convo[0]["content"], bos=True)
        t = time.perf_counter()
        greedy_answer(model, ids, REPLY_TOKENS, frozenset(), 0)
        return time.perf_counter() - t

    times: dict[str, list[float]] = {k: [] for k in ("herd in", "herd out", "cpp in", "cpp out", "request")}
    lengths = {"in": [], "out": []}
    jobs: list[tuple[list[int], list[int]]] = []
    herd_check(guard_ids(conversations(1)[0][:1]))  # warm-up (native kernels built, caches touched)
    for convo in conversations(args.requests):
        ids_in, ids_out = guard_ids(convo[:1]), guard_ids(convo)
        lengths["in"].append(len(ids_in))
        lengths["out"].append(len(ids_out))
        times["herd in"].append(herd_check(ids_in))
        times["herd out"].append(herd_check(ids_out))
        times["request"].append(herd_request(convo))
        jobs.append((ids_in, ids_out))
    together = concurrent_times(model, [j[0] for j in jobs][:args.concurrent], herd_check) if args.concurrent else None
    cpp = llamacpp_times(path, args.threads, jobs)
    from bench.llamacpp import has_amx

    print("llama.cpp: weight repacking off (its AMX kernel crashes on this CPU; plain CPU kernels run)"
          if has_amx() else "llama.cpp: default settings")
    if cpp is not None:
        times["cpp in"], times["cpp out"] = cpp
    load1, load5, _ = os.getloadavg()
    print(f"# guard latency: {Path(path).name}, {args.requests} requests, {args.threads} threads, "
          f"{platform.processor() or platform.machine()}, load average {load1:.2f} / {load5:.2f} (1 / 5 min)")
    print(f"guard prompt tokens: input check median {statistics.median(lengths['in']):.0f}, "
          f"output check median {statistics.median(lengths['out']):.0f}; {ANSWER_TOKENS} answer tokens each")
    print("| check | llamaherd p50 ms | llamaherd p95 ms | llama.cpp p50 ms | llama.cpp p95 ms |")
    print("|---|---|---|---|---|")
    times["herd both"] = [a + b for a, b in zip(times["herd in"], times["herd out"])]
    times["cpp both"] = [a + b for a, b in zip(times["cpp in"], times["cpp out"])]
    for key, label in (("in", "input shield"), ("out", "output shield"), ("both", "both shields")):
        h, c = times[f"herd {key}"], times[f"cpp {key}"]
        cpp_cells = (f"{1e3 * percentile(c, .5):.1f} | {1e3 * percentile(c, .95):.1f}" if c else
                     "crashed (see above) | -")
        print(f"| {label} | {1e3 * percentile(h, .5):.1f} | {1e3 * percentile(h, .95):.1f} | {cpp_cells} |")
    if together is not None:
        print(f"{args.concurrent} input checks arriving at once (llamaherd), latency from arrival:")
        for label, xs in together.items():
            print(f"  {label}: p50 {1e3 * percentile(xs, .5):.1f} ms, p95 {1e3 * percentile(xs, .95):.1f} ms")
    r = times["request"]
    print(f"request itself (llamaherd, prompt + {REPLY_TOKENS} tokens): p50 {1e3 * percentile(r, .5):.1f} ms, "
          f"p95 {1e3 * percentile(r, .95):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
