"""Fidelity against a float64 reference: mean KLD and same-top-token rate of our runtime and of llama.cpp.

For a GGUF file the reference is the file's own weights decoded (as ggml defines them) and held in float64,
run through our reference model files in float64 with no native swaps (model/*.py; their RMSNorm and rotary
helpers compute in float32 and return float64, a rounding ~1e-7 relative, far below what is measured here).
Every other path is compared with it on the same chunks of the same text, scored like llama-perplexity
(llamaherd/eval/perplexity.py: chunks of --ctx tokens, BOS first, second half scored):

  ours            the runtime as `llamaherd.load` builds it, with int8 activations on/off and bf16 prefill on/off
                  (native/ggml_kernels.py INT8_ACTIVATIONS, BF16_PREFILL; bf16 only where the CPU has it)
  llama.cpp       llama-cpp-python on the same file (logits_all; its default f16 KV cache)
  llama.cpp F32   with --llama-cpp-f32: llama.cpp on the same weights written out as an F32 GGUF (decoded as ggml
                  defines them, so the same model): its float kernels, without the 8-bit rounding of activations
                  its quantized dot products do (ggml-cpu vec_dot_type: Q8_K for k-quants, Q8_0 for Q8_0/Q5_0)

each through the prefill path (the chunk in one forward / one llama_decode) and the decode path (one token
per step into a KV cache / n_batch=1), side by side in one run. Each row also gives the perplexity of its
positions (llama-perplexity's PPL over the scored halves), the float64 reference's first.

    .venv/bin/python bench/eval_fidelity.py [MODEL.gguf] --ctx 256 --chunks 4 --decode-chunks 1 [--llama-cpp-f32]

The text defaults to `llama_models/llama3_1/prompt_format.md` from Meta's llama-models package (a core
dependency: the same file on every install).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from importlib.resources import files

import numpy as np
import torch

import llamaherd
from llamaherd import store
from llamaherd.checkpoint import materialize, read
from llamaherd.checkpoint.base import dequantized
from llamaherd.checkpoint.gguf_write import write
from llamaherd.engine.generate import decode_one
from llamaherd.eval.perplexity import chunk_tokens, next_tokens, scored_view
from llamaherd.model.cache import KVCache
from llamaherd.native import ggml_kernels

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llamacpp  # noqa: E402  (bench/llamacpp.py)


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.double(), dim=-1)


def kld_and_top(ref: torch.Tensor, other: torch.Tensor, target: torch.Tensor) -> tuple[np.ndarray, ...]:
    """Per position KL(ref || other) over the whole vocabulary, whether the argmax agrees, and other's NLL of the
    text's next token; (T, V) log-probs, (T,) targets."""
    kld = (ref.exp() * (ref - other)).sum(-1)
    nll = -other.gather(-1, target[:, None])[:, 0]
    return kld.numpy(), (ref.argmax(-1) == other.argmax(-1)).numpy(), nll.numpy()


def float64_reference(path: str) -> torch.nn.Module:
    """The file's weights decoded as ggml defines them, in float64; each float32 tensor is let go as its float64
    copy is made, so the peak is the float64 model plus one tensor (a 1B model: 10 GB, not 15)."""
    ckpt = dequantized(read(path), "the float64 reference")
    sd, done = ckpt.state_dict, {}
    for name, t in list(sd.items()):
        if t.is_floating_point():
            if id(t) not in done:  # a tied embedding is one tensor under two names: one copy
                done[id(t)] = t.double()
            sd[name] = done[id(t)]
        del t
    return materialize(ckpt, dtype=torch.float64).eval()


@torch.inference_mode()
def prefill_logits(net, chunk: torch.Tensor) -> torch.Tensor:
    n_ctx = chunk.shape[-1]
    return scored_view(net, n_ctx // 2)(chunk[None])[0, :-1]  # (n_ctx - 1 - n_ctx/2, V)


@torch.inference_mode()
def decode_logits(net, chunk: torch.Tensor, config, dtype=torch.float32) -> torch.Tensor:
    n_ctx = chunk.shape[-1]
    cache = KVCache.for_model(config, 1, n_ctx, dtype=dtype)
    out = []
    for j in range(n_ctx - 1):
        logits = decode_one(net, chunk[j:j + 1], cache)
        if j >= n_ctx // 2:
            out.append(logits[0].float())
    return torch.stack(out)


def llama_cpp_logits(llm, chunk: torch.Tensor) -> torch.Tensor:
    n_ctx = chunk.shape[-1]
    llm.reset()
    llm.eval(chunk.tolist())
    return torch.from_numpy(np.array(llm.scores[n_ctx // 2:n_ctx - 1], dtype=np.float32))


@contextlib.contextmanager
def switches(int8: bool, bf16: bool):
    before = ggml_kernels.INT8_ACTIVATIONS, ggml_kernels.BF16_PREFILL
    ggml_kernels.INT8_ACTIVATIONS, ggml_kernels.BF16_PREFILL = int8, bf16
    try:
        yield
    finally:
        ggml_kernels.INT8_ACTIVATIONS, ggml_kernels.BF16_PREFILL = before


def table(rows: dict[tuple[str, str], list]) -> None:
    print("| path | implementation | positions | mean KLD vs float64 | max KLD | same top token | PPL |")
    print("|---|---|---|---|---|---|---|")
    for (kind, label), parts in rows.items():
        kld, same, nll = (np.concatenate(col) for col in zip(*parts))
        print(f"| {kind} | {label} | {kld.size} | {kld.mean():.3e} | {kld.max():.3e} | {100 * same.mean():.2f}% "
              f"| {np.exp(nll.mean()):.4f} |", flush=True)


def paired(rows: dict[tuple[str, str], list], kind: str, against: str = "llama.cpp") -> None:
    """Each of our rows against `against` on the same positions: the mean of the per-position KLD differences with
    a 95% bootstrap interval (10,000 resamples of positions). KLD is heavy-tailed (a few positions carry most of the
    mean), so a gap between two means says little until its interval excludes zero."""
    base = rows.get((kind, against))
    if base is None:
        return
    theirs = np.concatenate([part[0] for part in base])
    rng = np.random.default_rng(0)
    picks = rng.integers(0, theirs.size, size=(10_000, theirs.size))
    for (k, label), parts in rows.items():
        if k != kind or not label.startswith("llamaherd"):
            continue
        diff = np.concatenate([part[0] for part in parts]) - theirs
        lo, hi = np.percentile(diff[picks].mean(axis=1), [2.5, 97.5])
        print(f"# {kind}: {label} minus {against}: mean KLD difference {diff.mean():+.3e} "
              f"(95% interval {lo:+.3e} .. {hi:+.3e}; ours lower at {100 * (diff < 0).mean():.0f}% of positions)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="a GGUF file (default: the default model from the local store)")
    ap.add_argument("--text", help="UTF-8 text file (default: llama-models' llama3_1/prompt_format.md)")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=4, help="chunks through the prefill path")
    ap.add_argument("--decode-chunks", type=int, default=1, help="chunks through the decode path (one token a step)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--llama-cpp-f32", action="store_true",
                    help="also run llama.cpp on the same weights written as an F32 GGUF (a temporary file)")
    args = ap.parse_args()
    import llama_cpp

    print(f"# {llamacpp.prepare()}", flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    path = args.model or str(store.default_model(progress=lambda *_: None))
    text = (open(args.text, encoding="utf-8").read() if args.text else
            files("llama_models").joinpath("llama3_1/prompt_format.md").read_text(encoding="utf-8"))
    print(f"# {os.path.basename(path)}, ctx {args.ctx}, {args.chunks} prefill / {args.decode_chunks} decode chunks, "
          f"{threads} threads, load average {os.getloadavg()[0]:.2f}; bf16 CPU: {ggml_kernels.BF16_PREFILL}",
          flush=True)

    model = llamaherd.load(path)
    tokens = model.tokenizer.encode(text, bos=True)
    grid = chunk_tokens(tokens, args.ctx, model.tokenizer.bos_id, max(args.chunks, args.decode_chunks))
    targets = next_tokens(grid, tokens)
    ref_net = float64_reference(path)
    runs = {"llama.cpp": path}
    tmp = tempfile.TemporaryDirectory()
    if args.llama_cpp_f32:
        runs["llama.cpp F32"] = str(write(read(path), os.path.join(tmp.name, "f32.gguf"), qtype="f32"))
    llm = {(label, path_kind): llama_cpp.Llama(file, logits_all=True, n_ctx=args.ctx, n_batch=n_batch,
                                               n_threads=threads, verbose=False)
           for label, file in runs.items() for path_kind, n_batch in (("prefill", args.ctx), ("decode", 1))}
    bf16_modes = (True, False) if ggml_kernels.BF16_PREFILL else (False,)
    ours = [(f"llamaherd int8 {'on ' if i8 else 'off'}, bf16 {'on ' if b else 'off'}", i8, b)
            for i8 in (True, False) for b in bf16_modes]
    rows: dict[tuple[str, str], list] = {}
    t0 = time.perf_counter()
    for kind, n in (("prefill", args.chunks), ("decode", args.decode_chunks)):
        for c in range(n):
            chunk = grid[c]
            ref = log_probs(prefill_logits(ref_net, chunk) if kind == "prefill" else
                            decode_logits(ref_net, chunk, model.config, torch.float64))
            rows.setdefault((kind, "float64 reference"), []).append(kld_and_top(ref, ref, targets[c]))
            for label, i8, b in ours:
                with switches(i8, b):
                    got = prefill_logits(model.net, chunk) if kind == "prefill" else decode_logits(model.net, chunk,
                                                                                                     model.config)
                rows.setdefault((kind, label), []).append(kld_and_top(ref, log_probs(got), targets[c]))
            for label in runs:
                theirs = log_probs(llama_cpp_logits(llm[label, kind], chunk))
                rows.setdefault((kind, label), []).append(kld_and_top(ref, theirs, targets[c]))
            print(f"  {kind} chunk {c + 1}/{n} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        table({k: v for k, v in rows.items() if k[0] == kind})  # each path's table as soon as it is measured
        paired(rows, kind)
    print(f"# load average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
