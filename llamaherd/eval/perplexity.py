"""Perplexity of a model over a text, computed the way llama.cpp's `llama-perplexity` computes it.

The arithmetic follows llama.cpp tools/perplexity/perplexity.cpp (`perplexity`): the text is tokenized with
BOS, cut into non-overlapping chunks of n_ctx tokens (the tail shorter than n_ctx is dropped), each chunk's
first token is replaced by BOS, and only positions n_ctx/2 .. n_ctx-2 are scored, each predicting the next
token, so every scored token has at least n_ctx/2 tokens of context. PPL = exp(mean NLL); the uncertainty of
its `Final estimate: PPL = X +/- Y` line is PPL * sqrt((mean(NLL^2) - mean(NLL)^2) / (count - 1)).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import ContextLengthError, LlamaherdError

Progress = Callable[[int, int], None]  # (chunks done, chunks in all)


@dataclass
class Perplexity:
    """The result of `perplexity`: per scored token negative log-likelihoods (nats), chunk by chunk."""

    n_ctx: int
    n_chunks: int
    nll: np.ndarray  # (n_chunks * (n_ctx - 1 - n_ctx // 2),) float64

    @property
    def count(self) -> int:
        return int(self.nll.size)

    @property
    def ppl(self) -> float:
        return math.exp(float(self.nll.mean()))

    @property
    def uncertainty(self) -> float:
        """llama-perplexity's `+/-`: the standard error of the mean NLL, carried through exp."""
        mean = float(self.nll.mean())
        var = float((self.nll**2).mean()) - mean * mean
        return self.ppl * math.sqrt(var / (self.count - 1)) if var > 0 and self.count > 1 else float("nan")

    def final_line(self) -> str:
        return f"Final estimate: PPL = {self.ppl:.4f} +/- {self.uncertainty:.5f}"


# -- chunks and the forward over them -------------------------------------------------------------------------


def chunk_tokens(tokens: list[int], n_ctx: int, bos_id: int | None, max_chunks: int | None = None,
                 min_tokens: int | None = None) -> torch.Tensor:
    """(n_chunks, n_ctx) token ids: consecutive non-overlapping slices, each starting with BOS when the model
    has one (llama-perplexity overwrites the chunk's first token with it). A text needs `min_tokens` (default
    2 * n_ctx, llama-perplexity's own requirement); a KL base's tokens, already whole chunks, need one."""
    if n_ctx < 4:
        raise ContextLengthError(f"--num-ctx {n_ctx}: a context of at least 4 tokens is needed to score any token")
    need = 2 * n_ctx if min_tokens is None else min_tokens
    if len(tokens) < need:
        raise ContextLengthError(f"the text tokenizes to {len(tokens)} tokens; perplexity with a context of {n_ctx} "
                                 f"needs at least {need} (give a longer text or a smaller --num-ctx)")
    n = len(tokens) // n_ctx
    if max_chunks is not None and max_chunks > 0:
        n = min(n, max_chunks)
    chunks = torch.tensor(tokens[: n * n_ctx], dtype=torch.long).view(n, n_ctx)
    if bos_id is not None:
        chunks[:, 0] = bos_id
    return chunks


class _ScoredRows(nn.Module):
    """Stands in for the vocabulary projection: projects positions `first`.. only (the scored half of each chunk),
    so the other half's (n_ctx/2, vocab) logits are never computed."""

    def __init__(self, inner: nn.Module, first: int) -> None:
        super().__init__()
        self.inner = inner
        self.first = first

    def forward(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.inner(h[:, self.first:], weight)


def scored_view(net: nn.Module, first: int) -> nn.Module:
    """A shallow copy of `net` sharing every layer, whose logits start at position `first` (every family projects
    through `net.project`, model/llama.py VocabProjection; a final softcap is elementwise and stays)."""
    if not isinstance(getattr(net, "project", None), nn.Module):
        raise LlamaherdError(f"{type(net).__name__} has no vocabulary projection module to score through")
    view = copy.copy(net)
    view._modules = dict(net._modules)  # a new module table: the swap leaves `net` as it is
    view._modules["project"] = _ScoredRows(net._modules["project"], first)
    return view


@torch.inference_mode()
def scored_logits(net: nn.Module, chunks: torch.Tensor, batch: int = 1,
                  progress: Progress | None = None) -> Iterator[torch.Tensor]:
    """For each group of `batch` chunks, float32 logits (b, n_ctx - 1 - n_ctx/2, vocab) of the scored positions."""
    n, n_ctx = chunks.shape
    first = n_ctx // 2
    view = scored_view(net, first)
    device = next(net.parameters()).device
    for i in range(0, n, batch):
        logits = view(chunks[i:i + batch].to(device))[:, :-1].float()  # the last position predicts nothing here
        yield logits
        if progress is not None:
            progress(min(i + batch, n), n)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target], float64, for logits (..., V) and targets (...)."""
    lse = torch.logsumexp(logits, dim=-1).double()
    return lse - logits.gather(-1, targets[..., None])[..., 0].double()


def next_tokens(chunks: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """The token each scored position predicts: the original text's next token (the BOS overwrite is only input)."""
    n, n_ctx = chunks.shape
    first = n_ctx // 2
    orig = torch.tensor(tokens[: n * n_ctx], dtype=torch.long).view(n, n_ctx)
    return orig[:, first + 1:]  # (n, n_ctx - 1 - first)


def encode_text(model, text: str) -> list[int]:
    """The text's tokens with BOS in front when the model's vocabulary has one (llama.cpp's add_bos)."""
    tok = model.tokenizer
    if tok is None:
        raise LlamaherdError(f"{model.checkpoint.source}: this checkpoint has no tokenizer; pass token ids instead")
    return tok.encode(text, bos=tok.bos_id is not None)


def batch_for(n_ctx: int, batch_tokens: int = 2048) -> int:
    """Chunks per forward: llama-perplexity runs n_batch / n_ctx sequences at once (n_batch 2048 by default)."""
    return max(1, batch_tokens // n_ctx)


def perplexity(model, text: str | list[int], n_ctx: int = 512, *, chunks: int | None = None,
               batch_tokens: int = 2048, progress: Progress | None = None) -> Perplexity:
    """Perplexity of `model` (a `llamaherd.Model`) over `text` (a str, or token ids with BOS already in front)
    as llama-perplexity computes it with `-c n_ctx [--chunks chunks] [-b batch_tokens]`."""
    tokens = encode_text(model, text) if isinstance(text, str) else [int(t) for t in text]
    bos = model.tokenizer.bos_id if model.tokenizer is not None else None
    grid = chunk_tokens(tokens, n_ctx, bos, chunks)
    targets = next_tokens(grid, tokens)
    b = batch_for(n_ctx, batch_tokens)
    nll = [token_nll(logits, targets[i * b:i * b + logits.shape[0]].to(logits.device)).cpu()
           for i, logits in enumerate(scored_logits(model.net, grid, b, progress))]
    return Perplexity(n_ctx=n_ctx, n_chunks=grid.shape[0], nll=torch.cat(nll).flatten().numpy())
