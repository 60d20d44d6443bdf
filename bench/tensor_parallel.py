"""Tensor parallelism on the CPU: peak memory per rank and decode speed, TP=2 against one process, side by side.

Usage: .venv/bin/python bench/tensor_parallel.py [--model DIR] [--meta2 DIR] [--tokens 48] [--skip-memory|--skip-speed]
       .venv/bin/python bench/tensor_parallel.py --gguf FILE [--tokens 48]   (a packed GGUF: the default model's, say)

  memory   a ~1B random checkpoint (bench/make_llama1b.py's HF bf16 folder; --meta2: the same weights as a Meta
           folder of 2 shards, written here by `herd convert`'s writer when missing), loaded in fresh processes:
           one process with `llamaherd.load`, then 2 ranks with `parallel.load_parallel`. Each reports, relative to
           its RSS after imports, its VmHWM (peak RSS, file-backed mapped pages included) after loading and
           touching every weight, and its private (anonymous) RSS then.
  speed    greedy decoding of --tokens tokens after a 32-token prompt, batch 1, bf16: one process with 2 torch
           threads against 2 ranks with 1 thread each, rank 0 leading as `herd run --tp 2` does (inputs broadcast
           per forward, an all-reduce per attention and feed-forward, logits all-gathered). Prefill and decode
           rates are rank 0's.
  --gguf   both, on a packed GGUF file instead (each rank cuts the packed rows on block boundaries; the one
           process keeps the file mapped; float32 KV cache, the ggml kernels' default switches).

The load average is printed first: on a shared machine the numbers move with it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GiB = 2**30


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _weights(net) -> list:
    """Parameters and buffers (packed GGUF weights are buffers), each once."""
    return list({id(t): t for t in (*net.parameters(), *net.buffers())}.values())


def _touch(net) -> None:
    import torch

    with torch.no_grad():
        for p in _weights(net):
            for chunk in p.reshape(-1).split(2**20):  # a packed weight reshaped is its plain bytes
                float(chunk.float().sum())


def _memory_record(model, base: int, seconds: float) -> dict:
    _touch(model.net)
    n_bytes = sum(p.numel() * p.element_size() for p in _weights(model.net))
    return {"load_s": round(seconds, 1), "param_gib": n_bytes / GiB, "peak_gib": (_status("VmHWM") - base) / GiB,
            "anon_gib": _status("RssAnon") / GiB, "file_gib": _status("RssFile") / GiB}


def _one_memory(path: str, out: str) -> None:
    import llamaherd

    base = _status("VmRSS")
    t0 = time.perf_counter()
    model = llamaherd.load(path)
    Path(out).write_text(json.dumps(_memory_record(model, base, time.perf_counter() - t0)))


def _rank_memory(path: str, out_dir: str) -> None:
    import torch.distributed as dist

    from llamaherd.parallel import load_parallel

    base = _status("VmRSS")
    t0 = time.perf_counter()
    model = load_parallel(path)
    rec = _memory_record(model, base, time.perf_counter() - t0)
    Path(out_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(rec))


def _decode(model, tokens: int, lead_net: bool) -> dict:
    import torch

    from llamaherd.checkpoint.base import stored_dtype

    from llamaherd.engine.generate import decode_one, prefill
    from llamaherd.model.cache import KVCache

    net = model.net
    prompt = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    # the weights' float dtype: bf16 for the bf16 checkpoint, float32 for a GGUF (its norms; packed weights aside)
    dtype = stored_dtype(dict(net.named_parameters()))
    with torch.inference_mode():
        cache = KVCache.for_model(net.config, 1, 32 + tokens + 8, dtype=dtype)
        prefill(net, prompt[:, :8], cache)  # warm-up: first calls of every kernel
        cache = KVCache.for_model(net.config, 1, 32 + tokens + 8, dtype=dtype)
        t0 = time.perf_counter()
        logits = prefill(net, prompt, cache)
        t1 = time.perf_counter()
        ids = []
        for _ in range(tokens):
            tok = logits.argmax(-1)
            ids.append(int(tok))
            logits = decode_one(net, tok, cache)
        t2 = time.perf_counter()
    return {"prefill_tok_s": 32 / (t1 - t0), "decode_tok_s": tokens / (t2 - t1), "ids": ids}


def _one_speed(path: str, tokens: int, out: str) -> None:
    import torch

    import llamaherd

    torch.set_num_threads(2)
    model = llamaherd.load(path)
    Path(out).write_text(json.dumps({**_decode(model, tokens, False), "threads": torch.get_num_threads()}))


def _rank_speed(path: str, tokens: int, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from llamaherd.parallel import load_parallel
    from llamaherd.parallel.lockstep import follow, lead, release

    torch.set_num_threads(1)
    model = load_parallel(path)
    if dist.get_rank() == 0:
        lead(model.net)
        rec = _decode(model, tokens, True)
        release()
        Path(out_dir, "rank0.json").write_text(json.dumps({**rec, "threads": torch.get_num_threads()}))
    else:
        follow(model.net)


def _fresh(fn, *args) -> None:
    """Run fn(*args) in a fresh spawned process (its own peak memory), or in 2 spawned ranks for the _rank_ ones."""
    import multiprocessing as mp

    from llamaherd.train.distributed import launch

    if fn.__name__.startswith("_rank_"):
        assert launch(fn, args, 2) == 0
        return
    p = mp.get_context("spawn").Process(target=fn, args=args)
    p.start()
    p.join()
    assert p.exitcode == 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/llamaherd-bench/llama-3.2-1b-random/hf-bf16")
    ap.add_argument("--meta2", default="/tmp/llamaherd-bench/llama-3.2-1b-random/meta-2shards")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--gguf", default=None, help="a packed GGUF file: memory and speed on it alone")
    args = ap.parse_args()
    if args.gguf:
        args.model = args.gguf
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} on "
          f"{os.cpu_count()} cores", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="tp-bench-"))
    if not args.skip_memory:
        meta2 = Path(args.meta2)
        if not args.gguf and not (meta2 / "consolidated.01.pth").exists():
            from llamaherd.checkpoint import read
            from llamaherd.checkpoint.save import save

            save(read(Path(args.model)), meta2, "meta", shards=2)
        print("| checkpoint | ranks | rank | load s | weights held GiB | peak RSS GiB | private GiB | mapped GiB |")
        print("|---|---|---|---|---|---|---|---|")
        cases = [(Path(args.gguf).name, args.gguf)] if args.gguf else \
            [("HF safetensors bf16", args.model), ("Meta 2 shards bf16", str(meta2))]
        for label, path in cases:
            _fresh(_one_memory, path, str(tmp / "one.json"))
            r = json.loads((tmp / "one.json").read_text())
            print(f"| {label} | 1 | - | {r['load_s']} | {r['param_gib']:.2f} | {r['peak_gib']:.2f} | "
                  f"{r['anon_gib']:.2f} | {r['file_gib']:.2f} |", flush=True)
            _fresh(_rank_memory, path, str(tmp))
            for rank in range(2):
                r = json.loads((tmp / f"rank{rank}.json").read_text())
                print(f"| {label} | 2 | {rank} | {r['load_s']} | {r['param_gib']:.2f} | {r['peak_gib']:.2f} | "
                      f"{r['anon_gib']:.2f} | {r['file_gib']:.2f} |", flush=True)
    if args.skip_speed:
        return 0
    _fresh(_one_speed, args.model, args.tokens, str(tmp / "speed1.json"))
    _fresh(_rank_speed, args.model, args.tokens, str(tmp))
    one, two = (json.loads((tmp / f).read_text()) for f in ("speed1.json", "rank0.json"))
    print("\n| run | threads per process | prefill tok/s (32) | decode tok/s |")
    print("|---|---|---|---|")
    print(f"| 1 process | {one['threads']} | {one['prefill_tok_s']:.1f} | {one['decode_tok_s']:.2f} |")
    print(f"| TP=2 | {two['threads']} | {two['prefill_tok_s']:.1f} | {two['decode_tok_s']:.2f} |")
    same = next((i for i, (a, b) in enumerate(zip(one["ids"], two["ids"])) if a != b), len(one["ids"]))
    print(f"greedy ids equal: {one['ids'] == two['ids']} (first {same} of {len(one['ids'])} equal; bf16 or int8 "
          f"activations: the partial sums are rounded per rank, so a near tie may flip)")
    print(f"load average after: {os.getloadavg()[0]:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
