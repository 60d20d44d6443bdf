"""What every engine shares below its loop: the two model calls (prefill, decode_one), the record of one decoding step
of a batch, and the context policy (generate.py, speculative.py and scheduler.py all apply it, and so do the API and
Llama Guard before they start)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ContextLengthError
from ..model.cache import KVCache
from .text import Token


@dataclass
class Step:
    """One decoding step of the whole batch: what every row sampled, and what it means for each row."""

    tokens: list[int]  # (B,) ids fed back to the model; rows finished before this step repeat their last token
    rows: list[Token | None]  # per row its token this step (finish_reason set on its last); None: ended before


def check_context(prompt_len: int, limit: int, what: str = "the model's context window") -> None:
    """The context policy: a prompt must leave room for at least one new token. Never truncate silently."""
    if prompt_len == 0:
        raise ContextLengthError("empty prompt: give at least one token (a BOS token, for example)")
    if prompt_len >= limit:
        raise ContextLengthError(
            f"the prompt is {prompt_len} tokens but {what} is {limit} tokens (at least one must be left to "
            f"generate into); shorten the prompt or the conversation, or raise num_ctx up to the model's max_seq_len"
        )


def prefill(net: nn.Module, tokens: torch.Tensor, cache: KVCache, positions: torch.Tensor | None = None,
            key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Run the prompt tokens (B, T) through the model into the cache; return the last position's logits (B, V)."""
    return net(tokens, positions=positions, cache=cache, key_mask=key_mask, last_only=True)[:, -1]


def decode_one(net: nn.Module, token: torch.Tensor, cache: KVCache, positions: torch.Tensor | None = None,
               key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One new token per row (B,) at `positions` (B,) -> next-token logits (B, V)."""
    pos = None if positions is None else positions[:, None]  # (B, 1)
    return net(token[:, None], positions=pos, cache=cache, key_mask=key_mask)[:, -1]
