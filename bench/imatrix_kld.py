"""KL divergence against the float model of GGUF files quantized with and without an importance matrix.

    .venv/bin/python bench/imatrix_kld.py [MODEL.gguf] --types q4_0,q4_k_m --ctx 256 --calib-chunks 8 --eval-chunks 4

The float model is MODEL (default: the default model, Gemma 3 270M Q4_K_M, the only real weights this
machine holds) decoded to an F32 GGUF. The importance matrix is collected on it as `herd imatrix` does, over
llama-models' llama3_1/prompt_format.md; the KLD base is the float model's log-probabilities over a different
text, llama-models' llama3_2/text_prompt_format.md (`herd perplexity --kl-divergence-base`). Each type is then
written twice by `herd quantize` (without, then with `--imatrix`) and compared with the base
(`herd perplexity --kl-divergence`): mean KLD, 99th percentile, same top token.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llamaherd  # noqa: E402
from llamaherd.checkpoint import read  # noqa: E402
from llamaherd.checkpoint.gguf_write import write  # noqa: E402
from llamaherd.cli.imatrix import collector_for, without_logits  # noqa: E402
from llamaherd.eval import compare, save_base  # noqa: E402
from llamaherd.eval.perplexity import chunk_tokens, encode_text  # noqa: E402
from llamaherd.quant import imatrix  # noqa: E402

DEFAULT = Path.home() / ".cache/llamaherd/models/gemma-3-270m-q4_k_m/gemma-3-270m-q4_k_m.gguf"


def collect(model, text: str, n_ctx: int, chunks: int, name: str) -> imatrix.IMatrix:
    grid = chunk_tokens(encode_text(model, text), n_ctx, model.tokenizer.bos_id, chunks)
    im = imatrix.IMatrix(chunk_size=n_ctx, chunks=grid.shape[0], datasets=[name])
    collector = collector_for(model, im)
    view = without_logits(model.net)
    try:
        with torch.inference_mode():
            for i in range(grid.shape[0]):
                view(grid[i:i + 1])
    finally:
        collector.close()
    return im


def llama_models_text(name: str) -> str:
    """A page of llama-models' documentation, the texts these benchmarks calibrate and score on."""
    return files("llama_models").joinpath(name).read_text(encoding="utf-8")


def float_copy(model: str, work: str) -> Path:
    """MODEL decoded to an F32 GGUF in `work`, reused when already there: the float model of the comparison."""
    f32 = Path(work) / "f32.gguf"
    if not f32.exists():
        write(read(model), f32, qtype="f32")
    return f32


def kld_arguments(doc: str) -> argparse.ArgumentParser:
    """The options of a KLD-against-the-float-model benchmark: the model, context, scored chunks, work folder."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=str(DEFAULT))
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--eval-chunks", type=int, default=4)
    ap.add_argument("--workdir", help="keep the F32 file here and reuse it (default: a temporary folder)")
    return ap


def main() -> int:
    ap = kld_arguments(__doc__)
    ap.add_argument("--types", default="q4_0,q4_k_m")
    ap.add_argument("--calib-chunks", type=int, default=8)
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()}", flush=True)
    calib = llama_models_text("llama3_1/prompt_format.md")
    evaltext = llama_models_text("llama3_2/text_prompt_format.md")
    tmp = tempfile.TemporaryDirectory(prefix="imatrix-kld-")
    work = args.workdir or tmp.name
    f32 = float_copy(args.model, work)
    t0 = time.perf_counter()
    with llamaherd.native.disabled():  # the reference modules, whose inputs the hooks see (as herd imatrix)
        fmodel = llamaherd.load(f32)
    im = collect(fmodel, calib, args.ctx, args.calib_chunks, "llama3_1/prompt_format.md")
    imatrix.write_dat(im, os.path.join(tmp.name, "imatrix.dat"))
    im = imatrix.read(os.path.join(tmp.name, "imatrix.dat"))  # quantize from the file, as herd quantize does
    print(f"imatrix: {len(im.entries)} entries, {im.chunks} chunks of {args.ctx} ({time.perf_counter() - t0:.0f} s)",
          flush=True)
    del fmodel
    base = os.path.join(tmp.name, "base.kld")
    save_base(llamaherd.load(f32), evaltext, base, args.ctx, chunks=args.eval_chunks)
    rows = []
    for qtype in args.types.split(","):
        for use in (False, True):
            t0 = time.perf_counter()
            out = write(read(f32), os.path.join(work, f"{qtype}-{int(use)}.gguf"), qtype=qtype,
                        imatrix=im if use else None)
            secs = time.perf_counter() - t0
            cmp = compare(llamaherd.load(out), base)
            row = (qtype, "yes" if use else "no", out.stat().st_size / 2**20, cmp.mean_kld,
                   float(np.quantile(cmp.kld, 0.99)), 100 * cmp.same_top_rate, secs)
            rows.append(row)
            print("| {} | {} | {:.1f} | {:.5f} | {:.4f} | {:.1f}% | {:.0f} |".format(*row), flush=True)
            os.remove(out)
    print(f"\nload average at end: {os.getloadavg()}")
    print("| type | imatrix | MiB | mean KLD | KLD p99 | same top token | quantize s |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print("| {} | {} | {:.1f} | {:.5f} | {:.4f} | {:.1f}% | {:.0f} |".format(*row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
