"""llamaherd vs llama.cpp (llama-cpp-python) and transformers, side by side in ONE run: same machine, file, threads.

For each GGUF file: pp (one prefill of P tokens, last-token logits) and tg (N single-token decode steps) for
llamaherd (`herd bench`'s functions) and llama.cpp (`Llama.eval`, n_threads = n_threads_batch = --threads).
For an HF folder: decode tokens/s of llamaherd (bf16) vs transformers' eager `generate` (greedy, bf16).
Runs alternate between the engines and each reports its best of --repeat (`--median`: the median of the
--repeat alternating runs, each run's figures printed), so load from other processes on a shared machine hits
both alike. Prints a markdown table with ratios (llamaherd / other; > 1 means faster).

  .venv/bin/python bench/side_by_side.py --threads 2 --gguf gemma-3-270m-q4_k_m \
      --gguf /tmp/llamaherd-bench/llama-3.2-1b-random/q8_0.gguf --hf /tmp/llamaherd-bench/llama-3.2-1b-random/hf-bf16
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llamacpp  # noqa: E402  (bench/llamacpp.py)
from llamaherd import load, resolve  # noqa: E402
from llamaherd.cli.bench import decode_speed, memory_bandwidth, prompt_speed, weight_bytes_per_token  # noqa: E402


def _prompt(n: int) -> list[int]:
    return [int(t) for t in (torch.arange(n) * 7919 % 32000 + 100)]


class LlamaCpp:
    def __init__(self, path: Path, threads: int, ctx: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(str(path), n_threads=threads, n_threads_batch=threads, n_ctx=ctx, n_batch=512,
                         n_ubatch=512, verbose=False)

    def pp(self, n: int) -> float:
        self.llm.reset()
        t = time.perf_counter()
        self.llm.eval(_prompt(n))
        return n / (time.perf_counter() - t)

    def tg(self, n: int) -> float:
        self.llm.reset()
        self.llm.eval(_prompt(1))
        t = time.perf_counter()
        for i in range(n):
            self.llm.eval([100 + i])  # one token per call, as llama-bench's tg
        return n / (time.perf_counter() - t)


def gguf_rows(src: str, threads: int, pp_n: int, tg_n: int, repeat: int, median: bool = False) -> list[tuple]:
    path = resolve(src)
    model = load(path)
    net = model.net.eval()
    lc = LlamaCpp(path, threads, max(pp_n, tg_n) + 8)
    runs: dict[str, list[float]] = {"herd pp": [], "cpp pp": [], "herd tg": [], "cpp tg": []}
    for _ in range(repeat):  # alternate engines so background load hits both
        runs["herd pp"].append(prompt_speed(net, pp_n, 1))
        runs["cpp pp"].append(lc.pp(pp_n))
        runs["herd tg"].append(decode_speed(net, tg_n, 1))
        runs["cpp tg"].append(lc.tg(tg_n))
        print(f"# {Path(path).name} run {len(runs['herd pp'])}: "
              + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items())
              + f" (load average {os.getloadavg()[0]:.1f})", flush=True)
    best = {k: statistics.median(v) if median else max(v) for k, v in runs.items()}
    ceiling = memory_bandwidth() / weight_bytes_per_token(net)
    name = Path(path).name
    del lc, model, net
    gc.collect()
    return [
        (name, f"pp{pp_n}", best["herd pp"], "llama.cpp", best["cpp pp"], None),
        (name, f"tg{tg_n}", best["herd tg"], "llama.cpp", best["cpp tg"], ceiling),
    ]


def hf_rows(folder: str, threads: int, prompt_n: int, tg_n: int, repeat: int) -> list[tuple]:
    from transformers import AutoModelForCausalLM

    model = load(folder, dtype=torch.bfloat16)
    net = model.net.eval()
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ids = torch.tensor([_prompt(prompt_n)])

    @torch.inference_mode()
    def hf_generate(n: int) -> float:
        t = time.perf_counter()
        ref.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t

    best_herd, best_hf = 0.0, 0.0
    for _ in range(repeat):
        best_herd = max(best_herd, decode_speed(net, tg_n, 1, torch.bfloat16))
        # decode time = generate(1 + n) - generate(1): the prefill and first token cancel out
        best_hf = max(best_hf, tg_n / max(hf_generate(tg_n + 1) - hf_generate(1), 1e-9))
    ceiling = memory_bandwidth() / weight_bytes_per_token(net)
    return [(Path(folder).name + " (bf16)", f"tg{tg_n}", best_herd, "transformers", best_hf, ceiling)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gguf", action="append", default=[], help="GGUF file or store name (repeatable)")
    ap.add_argument("--hf", action="append", default=[], help="HF folder compared with transformers (repeatable)")
    ap.add_argument("-p", type=int, default=512, help="prompt tokens of pp (default 512)")
    ap.add_argument("-n", type=int, default=128, help="decode steps of tg (default 128)")
    ap.add_argument("--hf-n", type=int, default=32, help="decode steps for the transformers comparison (default 32)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--median", action="store_true", help="report the median of the --repeat runs, not the best")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, threads {args.threads}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    print(f"# {llamacpp.prepare()}", flush=True)
    rows: list[tuple] = []
    for src in args.gguf:
        rows += gguf_rows(src, args.threads, args.p, args.n, args.repeat, args.median)
    for folder in args.hf:
        rows += hf_rows(folder, args.threads, 16, args.hf_n, args.repeat)
    print("| model | test | llamaherd tok/s | vs | their tok/s | ratio | llamaherd / bandwidth ceiling |")
    print("|---|---|---:|---|---:|---:|---:|")
    for name, test, ours, other, theirs, ceiling in rows:
        ceil = f"{ours / ceiling:.0%} of {ceiling:.0f}" if ceiling else ""
        print(f"| {name} | {test} | {ours:.1f} | {other} | {theirs:.1f} | {ours / theirs:.2f}x | {ceil} |")
    print(f"# load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
