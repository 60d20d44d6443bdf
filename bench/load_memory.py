"""Peak resident memory while loading a ~1B-parameter bf16 checkpoint (Meta .pth and HF safetensors).

Usage: .venv/bin/python bench/load_memory.py [--dir /tmp/llamaherd-load-bench] [--keep]

Writes a random checkpoint shaped like Llama 3.2 1B (1.24B parameters, tied embeddings; 2.47 GB in bf16)
in both formats, then loads each in a fresh process with `llamaherd.load` and reports, relative to the
process's RSS after imports: peak RSS after loading, and peak RSS after touching every weight (a sum over
each tensor forces every mmap'd page in). A loader that copies the weights once peaks near 1x the model's
bytes; reading into memory and then converting would peak near 2x.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

GiB = 2**30

# Llama 3.2 1B's params.json (llama-models), vocab and widths as released.
PARAMS = {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
          "multiple_of": 256, "ffn_dim_multiplier": 1.5, "norm_eps": 1e-5, "rope_theta": 500000.0,
          "use_scaled_rope": True}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _peak_rss() -> int:
    # VmHWM, this address space's high-water mark. Not getrusage's ru_maxrss: Linux carries that across
    # exec, so a process started from a large parent (pytest with every test module imported) would report
    # the parent's size as its own peak.
    return _status("VmHWM")


def _current_rss() -> int:
    return _status("VmRSS")


def make(folder: Path) -> None:
    import torch

    from llamaherd.checkpoint import Checkpoint
    from llamaherd.checkpoint.meta_pth import config_from_params
    from llamaherd.checkpoint.save import save
    from llamaherd.model import build

    config = config_from_params(PARAMS, folder).replace(tie_embeddings=True)
    net = build(config, device="meta")
    sd = {}
    for i, (name, p) in enumerate(net.state_dict().items()):
        # Values are irrelevant to memory; a cheap distinct fill keeps writing fast on a shared machine.
        sd[name] = torch.full(p.shape, 0.01 * (i % 97), dtype=torch.bfloat16)
    ckpt = Checkpoint(config=config, state_dict=sd, source=folder)
    save(ckpt, folder / "meta", "meta")
    save(ckpt, folder / "hf", "hf")


def measure(path: Path) -> dict:
    import torch

    import llamaherd

    base = _current_rss()
    t0 = time.perf_counter()
    model = llamaherd.load(path)
    load_s = time.perf_counter() - t0
    after_load = _peak_rss()
    n_params, n_bytes = 0, 0
    with torch.no_grad():
        for p in model.net.parameters():
            for chunk in p.reshape(-1).split(2**20):  # small float temporaries, not a copy of the model
                chunk.float().sum()
            n_params += p.numel()
            n_bytes += p.numel() * p.element_size()
    return {"path": str(path), "params": n_params, "weight_bytes": n_bytes, "load_s": round(load_s, 2),
            "peak_after_load_bytes": after_load - base, "peak_after_touch_bytes": _peak_rss() - base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/llamaherd-load-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # child-process mode
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    if not (args.dir / "hf" / "config.json").exists():
        args.dir.mkdir(parents=True, exist_ok=True)
        print(f"writing a 1.24B-parameter bf16 checkpoint to {args.dir} ...", flush=True)
        make(args.dir)
    for fmt in ("meta", "hf"):
        out = subprocess.run([sys.executable, __file__, "--measure", str(args.dir / fmt)],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        w = r["weight_bytes"]
        print(f"{fmt:5s} {r['params'] / 1e9:.3f}B params, weights {w / GiB:.2f} GiB, load {r['load_s']} s, "
              f"peak RSS over baseline: after load {r['peak_after_load_bytes'] / GiB:.2f} GiB "
              f"({r['peak_after_load_bytes'] / w:.2f}x), after touching all weights "
              f"{r['peak_after_touch_bytes'] / GiB:.2f} GiB ({r['peak_after_touch_bytes'] / w:.2f}x)")
    if not args.keep:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
