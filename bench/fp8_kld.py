"""KL divergence against the float model of the load-time quantizations: fp8 (e4m3 weights per channel and
activations per token, on torch._scaled_mm), int8 and int4 weight-only; and the CPU cost of fp8's products.

    .venv/bin/python bench/fp8_kld.py [MODEL] --ctx 256 --eval-chunks 4 --schemes fp8,int8,int4

The float model is MODEL (default: the default model, Gemma 3 270M Q4_K_M, the only real weights this machine
holds) decoded to an F32 GGUF; the KLD base is its log-probabilities over llama-models'
llama3_2/text_prompt_format.md (`herd perplexity --kl-divergence-base`), and each scheme is that model loaded
with `quantize=` and compared with the base (`herd perplexity --kl-divergence`). The timing line is one
8192 x 2048 product per scheme (the 1B shape's feed-forward), one and 16 rows, this machine's threads.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llamaherd  # noqa: E402
from bench.imatrix_kld import float_copy, kld_arguments, llama_models_text  # noqa: E402
from llamaherd.eval import compare, save_base  # noqa: E402
from llamaherd.quant.fp8_mm import Fp8Linear  # noqa: E402


def product_ms(rows: int) -> dict[str, float]:
    """Median ms of one (rows x 2048) @ (2048 -> 8192) product: bf16 Linear and Fp8Linear on the CPU."""
    torch.manual_seed(0)
    w = torch.randn(8192, 2048) * 0.02
    x = torch.randn(rows, 2048)
    mods = {"bf16": (torch.nn.Linear(2048, 8192, bias=False).bfloat16(), x.bfloat16()),
            "fp8": (Fp8Linear.from_float(w), x)}
    mods["bf16"][0].weight.data.copy_(w)
    out = {}
    with torch.inference_mode():
        for name, (m, xin) in mods.items():
            m(xin)
            times = []
            for _ in range(5):
                t = time.perf_counter()
                m(xin)
                times.append(time.perf_counter() - t)
            out[name] = 1e3 * float(np.median(times))
    return out


def main() -> int:
    ap = kld_arguments(__doc__)
    ap.add_argument("--schemes", default="fp8,int8,int4")
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()}, threads {torch.get_num_threads()}", flush=True)
    tmp = tempfile.TemporaryDirectory(prefix="fp8-kld-")
    f32 = float_copy(args.model, args.workdir or tmp.name)
    evaltext = llama_models_text("llama3_2/text_prompt_format.md")
    base = os.path.join(tmp.name, "base.kld")
    save_base(llamaherd.load(f32), evaltext, base, args.ctx, chunks=args.eval_chunks)
    rows = []
    for scheme in args.schemes.split(","):
        t0 = time.perf_counter()
        cmp = compare(llamaherd.load(f32, quantize=scheme), base)
        rows.append((scheme, cmp.mean_kld, float(np.quantile(cmp.kld, 0.99)), 100 * cmp.same_top_rate,
                     time.perf_counter() - t0))
        print("| {} | {:.5f} | {:.4f} | {:.1f}% | {:.0f} |".format(*rows[-1]), flush=True)
    timing = {m: product_ms(m) for m in (1, 16)}
    print(f"\nload average at end: {os.getloadavg()}")
    print("| scheme | mean KLD | KLD p99 | same top token | load + score s |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| {} | {:.5f} | {:.4f} | {:.1f}% | {:.0f} |".format(*row))
    for m, t in timing.items():
        print(f"8192 x 2048 product, {m} row(s): bf16 {t['bf16']:.1f} ms, fp8 (_scaled_mm, CPU) {t['fp8']:.1f} ms "
              f"({t['fp8'] / t['bf16']:.0f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
