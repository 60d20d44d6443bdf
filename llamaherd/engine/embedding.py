"""Text embeddings: mean-pooled final hidden states (after the output norm), L2-normalised, per text.

llama.cpp's `--pooling mean` (llama-context.cpp, LLAMA_POOLING_TYPE_MEAN) averages the output-normed hidden
state ("result_norm") over every token of a sequence, BOS included; `llama-embedding` then L2-normalises
(common.cpp `common_embd_normalize`, embd_norm 2). The hidden states come from the built model through a
view whose vocabulary projection is swapped for the identity: the model's own forward, nothing re-implemented,
and the served model itself is never modified (the engine thread keeps decoding on it meanwhile).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ContextLengthError, LlamaherdError

POOLING = "mean"


class _Identity(nn.Module):
    """Stands in for the vocabulary projection: returns the final hidden states (float32) instead of logits."""

    def forward(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return h.float()


def hidden_state_view(net: nn.Module) -> nn.Module:
    """A shallow copy of `net` sharing every layer and weight, whose forward returns (B, T, dim) final hidden
    states instead of logits. Every family projects through `net.project` (model/llama.py VocabProjection)."""
    if not isinstance(getattr(net, "project", None), nn.Module):
        raise LlamaherdError(f"{type(net).__name__} has no vocabulary projection module to read hidden states before")
    view = copy.copy(net)
    view._modules = dict(net._modules)  # a new module table: swapping in it leaves `net` as it is
    view._modules["project"] = _Identity()
    config = getattr(net, "config", None)
    if config is not None and getattr(config, "final_logit_softcap", None) is not None:
        view.config = dataclasses.replace(config, final_logit_softcap=None)  # a bound on logits, not on states
    return view


@torch.inference_mode()
def embed(net: nn.Module, prompts: Sequence[Sequence[int]], max_len: int, normalize: bool = True) -> torch.Tensor:
    """(N, dim) float32 embeddings of token-id sequences: the mean of each one's final hidden states."""
    view = hidden_state_view(net)
    device = next(net.parameters()).device
    out = []
    for i, ids in enumerate(prompts):
        if not ids:
            raise LlamaherdError(f"input {i} is empty: there is nothing to embed")
        if len(ids) > max_len:
            raise ContextLengthError(f"input {i} is {len(ids)} tokens but the context window is {max_len} tokens; "
                                     "shorten it (nothing is truncated silently)")
        h = view(torch.tensor([list(ids)], dtype=torch.long, device=device))  # (1, T, dim)
        out.append(h[0].mean(dim=0))
    emb = torch.stack(out)
    return torch.nn.functional.normalize(emb, dim=-1) if normalize else emb
