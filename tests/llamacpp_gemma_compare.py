"""Gemma 3 270M (Q4_K_M GGUF, the default model) in llamaherd against llama.cpp: tokens, next-token
distributions and greedy continuations. Prints the numbers; `tests/test_llamacpp_gemma.py` asserts them.

    .venv/bin/python -m tests.llamacpp_gemma_compare

llama.cpp runs through llama-cpp-python on the same file. Our side is the model as `llamaherd.load` builds
it, either with each packed ggml weight decoded once into a float32 copy (`runtime=False`: float32
activations everywhere, the exact arithmetic of the decoded weights) or as the runtime runs it (`--runtime`:
packed weights and the fast kernels' activation precision, native/ggml_kernels.py).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

# Varied text: prose, code, digits, whitespace runs, accents, CJK, emoji, and one prompt longer than the
# 512-token sliding window so local layers drop keys.
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "In 1969, Neil Armstrong became the first person to",
    "Q: What is 17 * 23?\nA:",
    "Les élèves ont étudié la photosynthèse, et ils ont découvert que",
    "東京は日本の首都であり、",
    "Here is a list of fruits:\n1. Apple\n2. Banana\n3.",
    "   Indented    text with\ttabs and  double  spaces, then emoji 🎉🚀 and",
    "The quick brown fox jumps over the lazy dog. " * 60 + "The moral of the story is",
]
GREEDY_TOKENS = 16


def dequantized(net: nn.Module) -> nn.Module:
    """Replace every packed ggml Linear/Embedding with a float32 module holding the decoded weight."""
    from llamaherd.quant import GGMLEmbedding, GGMLLinear

    for name, mod in list(net.named_modules()):
        if isinstance(mod, (GGMLLinear, GGMLEmbedding)):
            w = mod.weight.dequantize(torch.float32)
            new = nn.Linear(w.shape[1], w.shape[0], bias=False) if isinstance(mod, GGMLLinear) else nn.Embedding(*w.shape)
            new.weight = nn.Parameter(w, requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, child, new)
    return net


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@dataclass
class Report:
    prompts: int = 0
    tokens_equal: int = 0
    positions: int = 0
    top1_equal: int = 0
    # |log p_ours - log p_llamacpp| at llama.cpp's 10 most likely tokens of each position
    top10_diffs: list[float] = field(default_factory=list)
    top1_diffs: list[float] = field(default_factory=list)  # the same at llama.cpp's most likely token
    kl: list[float] = field(default_factory=list)  # KL(llama.cpp || ours) per position, in nats
    greedy_equal: list[int] = field(default_factory=list)  # per prompt: leading generated tokens that agree
    lines: list[str] = field(default_factory=list)

    @property
    def top1_rate(self) -> float:
        return self.top1_equal / max(self.positions, 1)

    def summary(self) -> str:
        d = np.array(self.top10_diffs)
        g = self.greedy_equal
        return "\n".join([
            *self.lines,
            f"token ids identical: {self.tokens_equal}/{self.prompts} prompts",
            f"top-1 identical: {self.top1_equal}/{self.positions} positions ({100 * self.top1_rate:.1f}%)",
            f"|log-prob difference| over llama.cpp's top-10 tokens: max {d.max():.4f}, mean {d.mean():.4f}",
            f"|log-prob difference| at llama.cpp's top-1 token: max {max(self.top1_diffs):.4f}, "
            f"mean {np.mean(self.top1_diffs):.4f}",
            f"KL(llama.cpp || ours) per position: max {max(self.kl):.4f}, mean {np.mean(self.kl):.4f} nats",
            f"greedy continuations identical for all {GREEDY_TOKENS} tokens: "
            f"{sum(n >= GREEDY_TOKENS for n in g)}/{len(g)} prompts (agreeing prefix lengths {g})",
        ])


def compare(model_path, prompts=PROMPTS, n_threads: int = 2, log=print, runtime: bool = False, **llama_kwargs) -> Report:
    import llama_cpp

    import llamaherd
    from llamaherd.model import KVCache

    t0 = time.time()
    ours = llamaherd.load(model_path)
    net = ours.net if runtime else dequantized(ours.net)
    tok = ours.tokenizer
    llm = llama_cpp.Llama(str(model_path), logits_all=True, n_threads=n_threads, n_ctx=1024, verbose=False, **llama_kwargs)
    log(f"loaded both in {time.time() - t0:.1f}s")
    rep = Report()
    for text in prompts:
        rep.prompts += 1
        ids = tok.encode(text, bos=True)
        ref_ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        rep.tokens_equal += ids == ref_ids
        # Distributions: every position of the prompt, llama.cpp's tokens for both.
        llm.reset()
        llm.eval(ref_ids)
        ref = log_softmax(np.array(llm.scores[: len(ref_ids)]))
        with torch.inference_mode():
            cache = KVCache.for_model(net.config, batch=1, max_len=len(ref_ids) + GREEDY_TOKENS)
            got = log_softmax(net(torch.tensor([ref_ids]), cache=cache)[0].numpy())
            # Greedy continuation: ours through the KV cache, llama.cpp through its own.
            mine, theirs = [int(got[-1].argmax())], [int(ref[-1].argmax())]
            for _ in range(GREEDY_TOKENS - 1):
                mine.append(int(net(torch.tensor([[mine[-1]]]), cache=cache)[0, -1].argmax()))
        for _ in range(GREEDY_TOKENS - 1):
            llm.eval([theirs[-1]])
            theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        rep.positions += len(ref_ids)
        rep.top1_equal += int((got.argmax(-1) == ref.argmax(-1)).sum())
        top10 = np.argsort(-ref, axis=-1)[:, :10]
        rep.top10_diffs += np.abs(np.take_along_axis(got, top10, -1) - np.take_along_axis(ref, top10, -1)).ravel().tolist()
        rep.top1_diffs += np.abs(np.take_along_axis(got, top10[:, :1], -1)[:, 0]
                                 - np.take_along_axis(ref, top10[:, :1], -1)[:, 0]).tolist()
        rep.kl += (np.exp(ref) * (ref - got)).sum(-1).tolist()
        agree = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), GREEDY_TOKENS)
        rep.greedy_equal.append(agree)
        line = f"{len(ids):4d} tokens ids={'same' if ids == ref_ids else 'DIFFER'} greedy agree {agree:2d}/{GREEDY_TOKENS}: {text[:40]!r} -> {tok.decode(mine)!r}"
        rep.lines.append(line)
        log(line)
    return rep


def main() -> int:
    from llamaherd import store

    rep = compare(store.default_model(), runtime="--runtime" in sys.argv)
    print(rep.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
