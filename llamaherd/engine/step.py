"""What every engine shares below its loop: the record of one decoding step of a batch, and the context policy
(generate.py, speculative.py and scheduler.py all apply it, and so do the API and Llama Guard before they start)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ContextLengthError
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
