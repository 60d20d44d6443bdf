"""What one image's cross-attention keys/values cost in Llama 3.2 Vision, measured on a real forward.

The per-image cache (`ImageContext.kv`) depends only on the cross-attention layers' key/value widths and the
image's tokens (max_tiles x tokens_per_tile), not on the feed-forward, vocabulary or encoder widths. So the model
here keeps the released values of those (8 or 20 cross-attention layers, 8 KV heads of 128, 560-pixel tiles of
1601 tokens, 4 tiles; 90B's layers have the same width, 20 of them) and shrinks the rest to fit this machine; it encodes one 4-tile image and reports the
bytes of the keys/values it holds and the process RSS growth, next to the formula. Meta's reference caches the
keys/values after repeating them to every query head (n_heads / n_kv_heads = 4 times more); that figure is
printed from the formula.

    .venv/bin/python bench/vision_xattn_memory.py
"""

from __future__ import annotations

import argparse
import os
import resource

import torch

from llamaherd.config import ModelConfig, VisionConfig
from llamaherd.model import build


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(name: str, dim: int, n_heads: int, n_cross: int, dtype: torch.dtype) -> None:
    vision = VisionConfig(image_size=560, width=16, n_layers=2, n_global_layers=1, n_heads=2,
                          intermediate_layers=(0,), n_cross_attention_layers=n_cross)
    config = ModelConfig(arch="mllama", dim=dim, n_layers=n_cross, n_heads=n_heads, n_kv_heads=8, vocab_size=256,
                         hidden_dim=64, vision=vision)
    net = build(config, dtype=dtype)
    tokens = torch.tensor([[1, 256, 5, 6]])
    tiles = torch.randn(1, 1, 4, 3, 560, 560, dtype=dtype)
    grid = torch.tensor([[[2, 2]]])
    before = rss_mib()
    ctx = net.image_context(tokens, tiles, grid)
    after = rss_mib()
    held = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in ctx.kv)
    ntok = 4 * vision.tokens_per_tile
    formula = n_cross * 2 * 8 * (dim // n_heads) * ntok * torch.finfo(dtype).bits // 8
    meta = formula * (n_heads // 8)
    print(f"| {name} | {str(dtype).removeprefix('torch.')} | {n_cross} | {ntok} | {held / 2**20:.1f} | "
          f"{formula / 2**20:.1f} | {after - before:.1f} | {meta / 2**20:.1f} |")


def measure_batch(n: int, dtype: torch.dtype = torch.bfloat16) -> None:
    """The serving engine: n one-image requests decoding together read one stacked context, built once per batch
    composition (`vision_inputs.BatchImages`); each sequence's own context then views its row of the stack."""
    from llamaherd.vision_inputs import BatchImages, PreparedImages

    vision = VisionConfig(image_size=560, width=16, n_layers=2, n_global_layers=1, n_heads=2,
                          intermediate_layers=(0,), n_cross_attention_layers=8)
    config = ModelConfig(arch="mllama", dim=4096, n_layers=8, n_heads=32, n_kv_heads=8, vocab_size=256,
                         hidden_dim=64, vision=vision)
    net = build(config, dtype=dtype)
    rows = [PreparedImages([1, 256, 5, 6], torch.randn(1, 1, 4, 3, 560, 560), torch.tensor([[[2, 2]]]), 256, i + 1)
            for i in range(n)]
    before = rss_mib()
    for r in rows:
        r.encode(net)
    encoded = rss_mib()
    batch = BatchImages()
    batch.inputs(net, rows, torch.tensor([[5]] * n), torch.tensor([[4]] * n))
    after = rss_mib()
    each = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in rows[0].encode(net).kv)
    print(f"serving, {n} one-image 11B requests decoding together ({str(dtype).removeprefix('torch.')}): "
          f"{each / 2**20:.1f} MiB each; RSS growth {encoded - before:.1f} MiB encoding them, then "
          f"{after - encoded:+.1f} MiB for the batch's stacked context (the sequences then view it)")


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}; torch threads {torch.get_num_threads()}")
    print("| model | dtype | cross layers | keys per image | held MiB | formula MiB | RSS growth MiB | Meta's cache MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for dtype in (torch.bfloat16, torch.float32):
        measure("11B Vision", 4096, 32, 8, dtype)
    # 90B's cross-attention layers have the same key/value width (8 heads of 128) and the same image tokens as
    # 11B's, so its per-image cache is 20/8 of the 11B row; its 8192-wide projections do not fit this machine.
    measure_batch(4)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
