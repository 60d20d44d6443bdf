"""Speculative decoding speed: n-gram prompt lookup on the default model for an input-grounded prompt (rewrite a
code block with one change), with and without, side by side with llama.cpp's prompt lookup
(`llama_cpp.llama_speculative.LlamaPromptLookupDecoding`) on the same file and prompt; then a draft-model pair
(the default Q4_K_M model drafting for a Q8_0 re-quantization of the same weights, written by `herd quantize`).

Greedy everywhere; the script reports whether speculation left llamaherd's tokens unchanged, and with
--exactness (untimed, after the timed runs) where and why they part: the top-2 logit margin of both paths at
the first differing position, the largest logit difference before it, and the same with the int8 activations
of the packed-weight decode kernels switched off. Times are CPU seconds
of this process with one thread for both engines (the machine is shared, so wall time is noisy); tokens/s is
generated tokens over decode CPU time (prompt processing excluded on both sides).

Usage: .venv/bin/python bench/speculative.py [--model GGUF] [--new 128] [--k 5] [--skip-draft] [--skip-ngram]
       [--exactness]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CODE = '''def moving_average(values, window):
    """Average of each run of `window` consecutive values."""
    if window <= 0:
        raise ValueError("window must be positive")
    out = []
    total = 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out


def main():
    data = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    print(moving_average(data, 3))
'''
PROMPT = ("Here is a Python file:\n\n```python\n" + CODE + "```\n\nThe same file with the function renamed from "
          "moving_average to rolling_mean, everything else unchanged:\n\n```python\n")


def cpu_timed(fn):
    t0 = time.process_time()
    out = fn()
    return time.process_time() - t0, out


def llamaherd_run(model, ids, new, **spec):
    """(decode CPU seconds, tokens, acceptance rate) of one greedy generation; prompt time measured apart."""
    from llamaherd.engine import SamplingParams, make_sampler
    from llamaherd.engine.generate import generate_tokens
    from llamaherd.engine.speculative import AcceptanceTracker, speculative_tokens

    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    sampler = make_sampler(params, model.config.vocab_size)
    prefill_params = params.replace(max_tokens=1)
    t_prompt, _ = cpu_timed(lambda: list(generate_tokens(model.net, [ids], make_sampler(prefill_params, 10**6))))
    if not spec:
        t, steps = cpu_timed(lambda: list(generate_tokens(model.net, [ids], sampler)))
        return t - t_prompt, [s.tokens[0] for s in steps], None
    tracker = AcceptanceTracker(spec["k"])
    t, steps = cpu_timed(lambda: list(speculative_tokens(model.net, ids, sampler, spec["proposer"], k=spec["k"],
                                                         tracker=tracker)))
    return t - t_prompt, [s.tokens[0] for s in steps], tracker.acceptance_rate


def llamacpp_run(path, ids, new, k=None):
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    draft = LlamaPromptLookupDecoding(num_pred_tokens=k) if k else None
    llm = Llama(model_path=str(path), n_ctx=2048, n_threads=1, n_threads_batch=1, verbose=False, draft_model=draft,
                logits_all=draft is not None)

    def gen(n):
        llm.reset()
        out = []
        for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            out.append(tok)
            if len(out) >= n:
                break
        return out

    t_prompt, _ = cpu_timed(lambda: gen(1))
    t, out = cpu_timed(lambda: gen(new))
    return t - t_prompt, out


def _rows_by_position(net, n_prompt, run):
    """Run `run()` with the network's forward wrapped; also return, for each generated position, the logits row
    that chose it (the last computed: a rejected proposal's later rows are recomputed in a later round)."""
    rows, forward = {}, net.forward

    def recording(tokens, *args, cache=None, **kwargs):
        start = cache.length if cache is not None else 0
        out = forward(tokens, *args, cache=cache, **kwargs)
        first = start + tokens.shape[1] - out.shape[1]  # last_only: one row, for the last token
        for j in range(out.shape[1]):
            rows[first + j + 1 - n_prompt] = out[0, j].float().clone()
        return out

    net.forward = recording
    try:
        return run(), rows
    finally:
        del net.forward  # the class's forward again


def _top2(row):
    vals, ids = torch.topk(row, 2)
    return f"{int(ids[0])} over {int(ids[1])} by {float(vals[0] - vals[1]):.4f}"


def exactness(model, ids, new, k, make_proposer) -> None:
    """Where greedy speculation and plain decoding part, and why: the top-2 logit margin of each path at the
    first differing position and the largest logit difference between the paths before it; then the same
    comparison with the int8 activations of the packed-weight matrix-vector products switched off."""
    from llamaherd.engine import SamplingParams, make_sampler
    from llamaherd.engine.generate import generate_tokens
    from llamaherd.engine.speculative import speculative_tokens
    from llamaherd.native import ggml_kernels

    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    net = model.net

    def both():
        plain, p_rows = _rows_by_position(net, len(ids), lambda: [
            s.tokens[0] for s in generate_tokens(net, [ids], make_sampler(params, model.config.vocab_size))])
        spec, s_rows = _rows_by_position(net, len(ids), lambda: [
            s.tokens[0] for s in speculative_tokens(net, ids, make_sampler(params, model.config.vocab_size),
                                                    make_proposer(), k=k)])
        first = next((i for i, (a, b) in enumerate(zip(plain, spec)) if a != b), None)
        upto = first if first is not None else min(len(plain), len(spec))
        diff = max(float((p_rows[i] - s_rows[i]).abs().max()) for i in range(upto))
        margins = [float(torch.topk(p_rows[i], 2).values.diff().abs()) for i in range(upto)]
        line = f"max |logit difference| plain vs speculative {diff:.4f} (logit std {float(p_rows[0].std()):.2f})"
        if first is None:
            print(f"    identical for {upto} tokens; {line}; smallest plain top-2 margin {min(margins):.4f}")
        else:
            print(f"    first difference at position {first}: plain picks {_top2(p_rows[first])}, speculative "
                  f"{_top2(s_rows[first])}; before it {line}")

    print("  exactness, int8 activations (the default decode kernels):")
    both()
    before = ggml_kernels.INT8_ACTIVATIONS
    ggml_kernels.INT8_ACTIVATIONS = False
    try:
        print("  exactness, float32 activations (ggml_kernels.INT8_ACTIVATIONS = False):")
        both()
    finally:
        ggml_kernels.INT8_ACTIVATIONS = before


def report(name, seconds, n, extra=""):
    print(f"{name:<48} {n / seconds:8.1f} tok/s  ({n} tokens, {seconds:.2f} s CPU){extra}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="GGUF file (default: the default model in the store)")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--skip-draft", action="store_true")
    ap.add_argument("--skip-ngram", action="store_true", help="only the draft-model pair")
    ap.add_argument("--exactness", action="store_true",
                    help="after the timed runs, untimed: where and why speculation and plain decoding part")
    args = ap.parse_args()
    torch.set_num_threads(1)

    import llamaherd
    from llamaherd.api import resolve
    from llamaherd.store import DEFAULT_MODEL

    path = Path(args.model) if args.model else resolve(DEFAULT_MODEL)
    print(f"model {path.name}; {args.new} new tokens, k={args.k}; load average {os.getloadavg()[0]:.2f}")
    model = llamaherd.load(path)
    ids = model.encode_prompt(PROMPT)
    print(f"prompt: {len(ids)} tokens\n")

    if not args.skip_ngram:
        ngram_part(model, path, ids, args)
    if not args.skip_draft:
        draft_part(model, path, ids, args)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


def same_tokens(a, b) -> str:
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return "identical tokens" if first is None and len(a) == len(b) else f"tokens differ from position {first}"


def ngram_part(model, path, ids, args) -> None:
    from llamaherd.engine.speculative import NgramProposer

    t_plain, plain, _ = llamaherd_run(model, ids, args.new)
    report("llamaherd plain", t_plain, len(plain))
    t_ng, ng, rate = llamaherd_run(model, ids, args.new, proposer=NgramProposer(), k=args.k)
    report("llamaherd n-gram lookup", t_ng, len(ng), f"  acceptance {rate:.2f}, speedup {t_plain / t_ng:.2f}x, "
           f"{same_tokens(ng, plain)}")
    if args.exactness:
        exactness(model, ids, args.new, args.k, NgramProposer)
    try:
        from llamacpp import prepare

        print(prepare())
        c_plain_t, c_plain = llamacpp_run(path, ids, args.new)
        report("llama.cpp plain", c_plain_t, len(c_plain))
        c_ng_t, c_ng = llamacpp_run(path, ids, args.new, k=args.k)
        report("llama.cpp LlamaPromptLookupDecoding", c_ng_t, len(c_ng), f"  speedup {c_plain_t / c_ng_t:.2f}x, "
               f"{same_tokens(c_ng, c_plain)} (vs llama.cpp plain)")
        same = sum(a == b for a, b in zip(plain, c_plain))
        print(f"llama.cpp plain and llamaherd pick the same token at {same}/{len(plain)} positions "
              f"(first difference at {next((i for i, (a, b) in enumerate(zip(plain, c_plain)) if a != b), None)})")
    except ImportError:
        print("llama-cpp-python is not installed: no llama.cpp column")
    print(f"\ngenerated text:\n{model.tokenizer.decode(plain)}\n")


def draft_part(model, path, ids, args) -> None:
    import llamaherd
    from llamaherd.engine.speculative import DraftProposer

    with tempfile.TemporaryDirectory() as tmp:
        q8 = Path(tmp) / "target-q8_0.gguf"
        subprocess.run([sys.executable, "-m", "llamaherd", "quantize", str(path), str(q8), "--type", "q8_0"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = llamaherd.load(q8)
        t_t, t_plain_ids, _ = llamaherd_run(target, ids, args.new)
        report("llamaherd Q8_0 target plain", t_t, len(t_plain_ids))
        t_d, d_ids, rate = llamaherd_run(target, ids, args.new, proposer=DraftProposer(model.net), k=args.k)
        report("llamaherd Q8_0 target, Q4_K_M draft", t_d, len(d_ids),
               f"  acceptance {rate:.2f}, speedup {t_t / t_d:.2f}x, {same_tokens(d_ids, t_plain_ids)}")
        if args.exactness:
            exactness(target, ids, args.new, args.k, lambda: DraftProposer(model.net))


if __name__ == "__main__":
    main()
