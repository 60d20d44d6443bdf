"""The simple generation path: a ladder of small functions (prefill, decode_one, sample, generate) on a KVCache.

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

from ..errors import ContextLengthError
from ..model.cache import KVCache
from .sampling import SampleOutput, Sampler, SamplingParams
from .stats import GenerationStats
from .text import TextStream

# When max_tokens is None the cache starts this much past the prompt and doubles as needed, so an
# unbounded request on a 128k-context model does not allocate the whole window up front.
_CACHE_CHUNK = 1024


# --------------------------------------------------------------------------------------------------------------
# The ladder
# --------------------------------------------------------------------------------------------------------------


def prefill(net: nn.Module, tokens: torch.Tensor, cache: KVCache, positions: torch.Tensor | None = None,
            key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Run the prompt tokens (B, T) through the model into the cache; return the last position's logits (B, V)."""
    return net(tokens, positions=positions, cache=cache, key_mask=key_mask, last_only=True)[:, -1]


def decode_one(net: nn.Module, token: torch.Tensor, cache: KVCache, positions: torch.Tensor | None = None,
               key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One new token per row (B,) at `positions` (B,) -> next-token logits (B, V)."""
    pos = None if positions is None else positions[:, None]  # (B, 1)
    return net(token[:, None], positions=pos, cache=cache, key_mask=key_mask)[:, -1]


def sample(logits: torch.Tensor, sampler: Sampler, context: Sequence[Sequence[int]],
           generated: Sequence[Sequence[int]]) -> SampleOutput:
    return sampler(logits, context, generated)


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


@dataclass
class Step:
    """One decoding step for every row: the sampled tokens and which rows just finished, and why."""

    tokens: list[int]  # (B,) sampled ids; rows finished before this step repeat their last token
    active: list[bool]  # rows that were still generating at this step (their token counts)
    finished: dict[int, str]  # row -> "stop" | "length", for rows that finish at this step
    sample: SampleOutput


def check_context(prompt_len: int, limit: int, what: str = "the model's context window") -> None:
    """The context policy: a prompt must leave room for at least one new token. Never truncate silently."""
    if prompt_len >= limit:
        raise ContextLengthError(
            f"the prompt is {prompt_len} tokens but {what} is {limit} tokens (at least one must be left to "
            f"generate into); shorten the prompt or the conversation, or raise num_ctx up to the model's max_seq_len"
        )


def _grow(cache: KVCache, new_len: int) -> KVCache:
    bigger = KVCache(cache.k.shape[0], cache.batch, new_len, cache.k.shape[2], cache.k.shape[4],
                     dtype=cache.k.dtype, device=cache.k.device)
    bigger.k[:, :, :, : cache.length] = cache.k[:, :, :, : cache.length]
    bigger.v[:, :, :, : cache.length] = cache.v[:, :, :, : cache.length]
    bigger.length = cache.length
    return bigger


@torch.inference_mode()
def generate_tokens(net: nn.Module, prompts: Sequence[Sequence[int]], sampler: Sampler, *,
                    stop_ids: frozenset[int] = frozenset(), context_limit: int | None = None,
                    stats: GenerationStats | None = None) -> Iterator[Step]:
    """Yield one `Step` per decoding step until every row has stopped.

    A row stops on a token in `stop_ids` (that token is reported in the step but is not part of the output),
    after `sampler.params.max_tokens` tokens, or when it reaches the context window (`context_limit`,
    default the model's max_seq_len).
    """
    config = net.config
    limit = context_limit or config.max_seq_len
    params: SamplingParams = sampler.params
    device = next(net.parameters()).device
    lengths = [len(p) for p in prompts]
    if not prompts or min(lengths) == 0:
        raise ContextLengthError("empty prompt: give at least one token (a BOS token, for example)")
    for n in lengths:
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
            out = sample(logits, sampler, context, generated)
            picked = out.tokens.tolist()
            finished: dict[int, str] = {}
            was_active = list(active)
            for row in range(B):
                if not active[row]:
                    picked[row] = last[row]
                    continue
                tok = picked[row]
                if tok in stop_ids:
                    finished[row] = "stop"
                    continue
                generated[row].append(tok)
                context[row].append(tok)
                if (params.max_tokens is not None and len(generated[row]) >= params.max_tokens) or \
                        lengths[row] + len(generated[row]) >= limit:
                    finished[row] = "length"
            for row in finished:
                active[row] = False
            last = picked
            if stats is not None:
                stats.generated_tokens += sum(1 for r in range(B) if was_active[r] and finished.get(r) != "stop")
            yield Step(picked, was_active, finished, out)
            if not any(active):
                break
            if cache.length >= cache.max_len:
                cache = _grow(cache, min(cache.max_len * 2, cache_cap))
            if key_mask is not None:
                key_mask = torch.cat([key_mask, torch.ones(B, 1, dtype=torch.bool, device=device)], 1)  # (B, S+1)
            pos = next_pos if key_mask is not None else None
            logits = decode_one(net, torch.tensor(picked, device=device), cache, pos, key_mask)
            next_pos = next_pos + 1
    finally:  # also when the consumer stops early (a stop string, Ctrl+C)
        if stats is not None:
            stats.eval_seconds += time.perf_counter() - t1


# --------------------------------------------------------------------------------------------------------------
# Text: completions and streams of valid UTF-8 pieces
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Piece:
    """A streamed piece of one completion: text released by one token (possibly empty), and that token."""

    text: str
    token: int | None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # set on the last piece: "stop" or "length"
    stop_token: int | None = None  # the end token that stopped generation (not part of the text)


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
           stats: GenerationStats | None = None, skip_special: bool = False) -> Iterator[Piece]:
    """One prompt -> pieces of valid UTF-8 text. Stop strings are never emitted, even when they span tokens.

    skip_special drops control tokens from the text (for display); chat parsing needs them, so it is off by default.
    """
    text = TextStream(tokenizer, sampler.params.stop, prompt_tail=prompt, skip_special=skip_special)
    want_lp = sampler.params.logprobs or sampler.params.top_logprobs
    for step in generate_tokens(net, [prompt], sampler, stop_ids=stop_ids, context_limit=context_limit, stats=stats):
        reason = step.finished.get(0)
        tok = step.tokens[0]
        lp = top = None
        if want_lp:
            lp = float(step.sample.logprobs[0])
            if step.sample.top_ids is not None:
                top = list(zip(step.sample.top_ids[0].tolist(), step.sample.top_logprobs[0].tolist()))
        if reason == "stop":
            yield Piece(text.flush(), None, finish_reason="stop", stop_token=tok)
            return
        piece = text.push(tok)
        if text.stopped:
            yield Piece(piece, tok, lp, top, finish_reason="stop")
            return
        if reason == "length":
            yield Piece(piece + text.flush(), tok, lp, top, finish_reason="length")
            return
        yield Piece(piece, tok, lp, top)


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
    parts: list[list[str]] = [[] for _ in prompts]
    ids: list[list[int]] = [[] for _ in prompts]
    reasons: list[str | None] = [None] * len(prompts)
    for step in generate_tokens(net, prompts, sampler, stop_ids=stop_ids, context_limit=context_limit):
        for row, tok in enumerate(step.tokens):
            if not step.active[row] or reasons[row] is not None:
                continue
            why = step.finished.get(row)
            if why == "stop":
                parts[row].append(texts[row].flush())
                reasons[row] = "stop"
                continue
            ids[row].append(tok)
            parts[row].append(texts[row].push(tok))
            if texts[row].stopped:
                reasons[row] = "stop"
            elif why == "length":
                parts[row].append(texts[row].flush())
                reasons[row] = "length"
    return [Completion("".join(p), i, r or "length", len(q)) for p, i, r, q in zip(parts, ids, reasons, prompts)]
