"""The memory plan (llamaherd/memory.py) against the measured peak: load, fill the context, compare with VmHWM.

Usage: .venv/bin/python bench/memory_plan.py [--num-ctx 2048] [--models 1b,gguf] [--threads 2]

Each model runs in a fresh process: `llamaherd.load(path, num_ctx=N)` (which makes the plan before touching a
weight), then a prompt of N - 16 token ids and 16 greedy tokens, so the KV cache holds the whole context and
every weight is read. The process's own high-water mark (VmHWM, /proc/self/status) is the measured peak; the
plan's total is what `herd show MODEL --memory --num-ctx N` prints. Models: `1b` is the Llama-3.2-1B-shaped
random bf16 checkpoint of bench/make_llama1b.py (made when missing), `gguf` the default model (Gemma 3 270M
Q4_K_M).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMA_1B = Path("/tmp/llamaherd-bench/llama-3.2-1b-random/hf-bf16")
NEW_TOKENS = 16

CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[3]))
from llamaherd.api import load

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

n = int(sys.argv[2])
t0 = time.perf_counter()
model = load(sys.argv[1], num_ctx=n)
plan = model.memory_plan
vocab = model.config.vocab_size
prompt = [(i * 7919) % (vocab - 1000) + 500 for i in range(n - {new})]  # ordinary ids, no specials
model.complete(prompt, max_tokens={new}, temperature=0, num_ctx=n)
print(json.dumps({{"parts": {{name: b for name, b, _ in plan.rows()}}, "plan": plan.total, "peak": status("VmHWM"),
                  "seconds": time.perf_counter() - t0}}))
""".format(new=NEW_TOKENS)


def model_path(name: str) -> Path:
    if name == "1b":
        if not (LLAMA_1B / "config.json").exists():
            subprocess.run([sys.executable, str(ROOT / "bench" / "make_llama1b.py")], check=True)
        return LLAMA_1B
    if name == "gguf":
        from llamaherd.store import DEFAULT_MODEL, resolve_name

        return resolve_name(DEFAULT_MODEL)
    return Path(name)


def measure(path: Path, num_ctx: int, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(num_ctx), str(threads)], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-ctx", type=int, default=2048)
    ap.add_argument("--models", default="1b,gguf", help="1b, gguf, or paths, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print(f"load average {os.getloadavg()}; command: {' '.join(sys.argv)}")
    MiB = 1 << 20
    print(f"{'model':<8} {'num_ctx':>7} {'weights':>8} {'conv':>6} {'KV':>6} {'working':>8} {'runtime':>8} "
          f"{'plan MiB':>9} {'peak MiB':>9} {'plan/peak':>10} {'s':>6}")
    worst = 0.0
    for name in args.models.split(","):
        r = measure(model_path(name), args.num_ctx, args.threads)
        p = r["parts"]
        ratio = r["plan"] / r["peak"]
        working = p["working buffers"] + p.get("allocator", 0)  # live activations + what the C heap keeps
        worst = max(worst, abs(ratio - 1))
        print(f"{name:<8} {args.num_ctx:>7} {p['weights'] / MiB:>8.0f} {p.get('conversion', 0) / MiB:>6.0f} "
              f"{p['KV cache'] / MiB:>6.0f} {working / MiB:>8.0f} "
              f"{p['runtime'] / MiB:>8.0f} "
              f"{r['plan'] / MiB:>9.0f} {r['peak'] / MiB:>9.0f} {ratio:>10.3f} {r['seconds']:>6.1f}", flush=True)
    print(f"largest difference: {worst:.1%} (target: within 10%)")
    return 0 if worst <= 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
