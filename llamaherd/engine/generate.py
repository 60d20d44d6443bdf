"""The simple generation path: a ladder of small functions (prefill, decode_one, sample, generate) on a KVCache.

The bottom rungs, `prefill` and `decode_one` (one model call each), live in step.py, shared with speculative.py.

Shaped after gpt-fast `generate.py`: token streams are generators; a plain greedy reference (`greedy_reference`,
a full forward per token, no cache) is what the cached and batched paths are tested against. Batches of prompts
of different lengths are left-padded: a `key_mask` hides the padding slots and per-row `positions` keep each
row's rotary positions as if it were alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..model.cache import KVCache
from .sampling import SampleOutput, Sampler, SamplingParams
from .speculative import speculative_tokens
from .stats import GenerationStats
from .step import Step, check_context, decode_one, prefill  # noqa: F401  (the ladder's model calls)
from .text import Piece, TextStream, Token

# When max_tokens is None the cache starts this much past the prompt and doubles as needed, so an
# unbounded request on a 128k-context model does not allocate the whole window up front.
_CACHE_CHUNK = 1024


# --------------------------------------------------------------------------------------------------------------
# The ladder
# --------------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def greedy_reference(net: nn.Module, prompt: Sequence[int], n: int) -> list[int]:
    """The reference: n greedy tokens, each from a full forward over everything so far (no cache, no batch)."""
    device = next(net.parameters()).device
    ids = list(prompt)
    for _ in range(n):
        logits = net(torch.tensor([ids], device=device))[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


# --------------------------------------------------------------------------------------------------------------
# Token generation (batched, left-padded)
# --------------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def generate_tokens(net: nn.Module, prompts: Sequence[Sequence[int]], sampler: Sampler, *,
                    stop_ids: frozenset[int] = frozenset(), context_limit: int | None = None,
                    stats: GenerationStats | None = None) -> Iterator[Step]:
    """Yield one `Step` per decoding step until every row has stopped.

    A row stops on a token in `stop_ids` (reported with `stop_token` set: it is not part of the output),
    after `sampler.params.max_tokens` tokens, or when it reaches the context window (`context_limit`,
    default the model's max_seq_len).
    """
    config = net.config
    limit = context_limit or config.max_seq_len
    params: SamplingParams = sampler.params
    device = next(net.parameters()).device
    lengths = [len(p) for p in prompts]
    for n in lengths or [0]:  # no prompt at all counts as an empty one
        check_context(n, limit)
    B, L = len(prompts), max(lengths)
    pads = [L - n for n in lengths]

    # Rows share cache slots: slot L + t holds every row's t-th new token. The shortest row may run longest.
    steps_max = limit - min(lengths)
    if params.max_tokens is not None:
        steps_max = min(steps_max, params.max_tokens)
    cache_cap = L + steps_max
    cache_len = L + (min(steps_max, _CACHE_CHUNK) if params.max_tokens is None else steps_max)
    dtype = next(net.parameters()).dtype
    if not dtype.is_floating_point:
        dtype = torch.float32
    cache = KVCache.for_model(config, B, cache_len, dtype=dtype, device=device)

    tokens = torch.tensor([[0] * pad + list(p) for pad, p in zip(pads, prompts)], dtype=torch.long, device=device)
    if any(pads):
        key_mask = torch.ones(B, L, dtype=torch.bool, device=device)
        for row, pad in enumerate(pads):
            key_mask[row, :pad] = False
        positions = (torch.arange(L, device=device)[None] - torch.tensor(pads, device=device)[:, None]).clamp(min=0)
    else:
        key_mask, positions = None, None  # the causal fast path

    context = [list(p) for p in prompts]
    generated: list[list[int]] = [[] for _ in prompts]
    active = [True] * B
    want_logprobs = params.logprobs or params.top_logprobs
    if params.max_tokens == 0:
        return

    t0 = time.perf_counter()
    logits = prefill(net, tokens, cache, positions, key_mask)
    if stats is not None:
        stats.prompt_tokens += sum(lengths)
        stats.prompt_seconds += time.perf_counter() - t0
    t1 = time.perf_counter()
    next_pos = torch.tensor(lengths, device=device)  # (B,) rotary position of each row's next token
    last = [p[-1] for p in prompts]
    try:
        while True:
            out = sampler(logits, context, generated)
            picked = out.tokens.tolist()
            rows: list[Token | None] = [None] * B
            for row in range(B):
                if not active[row]:
                    picked[row] = last[row]
                    continue
                tok = rows[row] = _token(out, row, picked[row], want_logprobs)
                if tok.id in stop_ids:
                    tok.finish_reason, tok.stop_token = "stop", True
                    active[row] = False
                    continue
                generated[row].append(tok.id)
                context[row].append(tok.id)
                if stats is not None:
                    stats.generated_tokens += 1
                if (params.max_tokens is not None and len(generated[row]) >= params.max_tokens) or \
                        lengths[row] + len(generated[row]) >= limit:
                    tok.finish_reason = "length"
                    active[row] = False
            last = picked
            yield Step(picked, rows)
            if not any(active):
                break
            if cache.length >= cache.max_len:
                cache.grow(min(cache.max_len * 2, cache_cap))
            if key_mask is not None:
                key_mask = torch.cat([key_mask, torch.ones(B, 1, dtype=torch.bool, device=device)], 1)  # (B, S+1)
            pos = next_pos if key_mask is not None else None
            logits = decode_one(net, torch.tensor(picked, device=device), cache, pos, key_mask)
            next_pos = next_pos + 1
    finally:  # also when the consumer stops early (a stop string, Ctrl+C)
        if stats is not None:
            stats.eval_seconds += time.perf_counter() - t1


def _token(out: SampleOutput, row: int, token_id: int, want_logprobs: bool) -> Token:
    tok = Token(token_id)
    if want_logprobs:
        tok.logprob = float(out.logprobs[row])
        if out.top_ids is not None:
            tok.top_logprobs = list(zip(out.top_ids[row].tolist(), out.top_logprobs[row].tolist()))
    return tok


# --------------------------------------------------------------------------------------------------------------
# Text: completions and streams of valid UTF-8 pieces
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[Piece] = field(default_factory=list)  # per generated token, when asked for
    stats: GenerationStats | None = None
    stop_token: int | None = None  # the end token that stopped generation, if one did


def stream(net: nn.Module, tokenizer, prompt: Sequence[int], sampler: Sampler, *,
           stop_ids: frozenset[int] = frozenset(), context_limit: int | None = None,
           stats: GenerationStats | None = None, skip_special: bool = False, proposer=None,
           num_speculative_tokens: int = 5) -> Iterator[Piece]:
    """One prompt -> pieces of valid UTF-8 text. Stop strings are never emitted, even when they span tokens.

    skip_special drops control tokens from the text (for display); chat parsing needs them, so it is off by default.
    A `proposer` (engine/speculative.py) turns on speculative decoding, with the same output distribution.
    """
    text = TextStream(tokenizer, sampler.params.stop, prompt_tail=prompt, skip_special=skip_special)
    if proposer is None:
        steps = generate_tokens(net, [prompt], sampler, stop_ids=stop_ids, context_limit=context_limit, stats=stats)
    else:
        steps = speculative_tokens(net, prompt, sampler, proposer, k=num_speculative_tokens, stop_ids=stop_ids,
                                   context_limit=context_limit, stats=stats)
    for step in steps:
        piece = text.feed(step.rows[0])
        yield piece
        if piece.finish_reason:  # also a stop string: leaving the loop stops generate_tokens
            return


def complete(net: nn.Module, tokenizer, prompt: Sequence[int], sampler: Sampler, **kwargs) -> Completion:
    stats = kwargs.pop("stats", None) or GenerationStats()
    pieces = list(stream(net, tokenizer, prompt, sampler, stats=stats, **kwargs))
    want_lp = sampler.params.logprobs or sampler.params.top_logprobs
    tokens = [p.token for p in pieces if p.token is not None]
    return Completion(
        text="".join(p.text for p in pieces),
        token_ids=tokens,
        finish_reason=pieces[-1].finish_reason if pieces else "length",
        prompt_tokens=len(prompt),
        logprobs=[p for p in pieces if p.token is not None] if want_lp else [],
        stats=stats,
        stop_token=pieces[-1].stop_token if pieces else None,
    )


def complete_batch(net: nn.Module, tokenizer, prompts: Sequence[Sequence[int]], sampler: Sampler, *,
                   stop_ids: frozenset[int] = frozenset(), context_limit: int | None = None) -> list[Completion]:
    """Several prompts in one left-padded batch; each row's text is cut at its own stop string."""
    texts = [TextStream(tokenizer, sampler.params.stop, prompt_tail=p) for p in prompts]
    pieces: list[list[Piece]] = [[] for _ in prompts]
    for step in generate_tokens(net, prompts, sampler, stop_ids=stop_ids, context_limit=context_limit):
        for row, tok in enumerate(step.rows):
            if tok is not None and not (pieces[row] and pieces[row][-1].finish_reason):  # a stop string ends a row
                pieces[row].append(texts[row].feed(tok))
    return [Completion("".join(p.text for p in ps), [p.token for p in ps if p.token is not None],
                       ps[-1].finish_reason if ps else "length", len(q)) for ps, q in zip(pieces, prompts)]
