"""Speculative decoding: proposers (n-gram prompt lookup, a draft model) and the exact verification of their
proposals by the target model in one forward.

Verification is speculative sampling (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding", Algorithm 1; Chen et al. 2023, "Accelerating LLM Decoding with Speculative Sampling", Algorithm 2):
a proposed token x drawn from q is kept with probability min(1, p(x) / q(x)); at the first rejection the token
is drawn from norm(max(0, p - q)); when all k are kept one more is drawn from p. The output is distributed
exactly as the target's p. Here p is the *processed* distribution the normal path samples from (penalties, bias,
temperature, top-k/p, min-p, typical-p: `Sampler.probabilities`), each position with the history it would have
had, drafts included; under greedy a proposal is kept when it equals the processed argmax. A deterministic
proposer (n-gram lookup) is the case q = one-hot.

Exact in exact arithmetic: the verification forward (1 + k tokens) computes the values one-token steps compute up
to float summation order. Where the decode kernels round activations to int8 (packed GGUF weights), such last-bit
differences can change a rounding and move the logits by ~1, flipping a greedy near-tie (BENCHMARKS.md measures it).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LlamaherdError
from ..model.cache import KVCache
from .step import Step, check_context, prefill
from .sampling import Sampler
from .stats import GenerationStats
from .text import Token


class SpeculativeError(LlamaherdError, ValueError):
    """Speculative decoding cannot be set up as asked (unknown mode, a draft with another vocabulary, bad k)."""


# --------------------------------------------------------------------------------------------------------------
# Proposers
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Proposal:
    tokens: list[int]
    probs: torch.Tensor | None = None  # (k, V) the draft's distribution of each token; None: deterministic


class NgramProposer:
    """Prompt lookup (Saxena 2023, "Prompt Lookup Decoding"; llama.cpp `LlamaPromptLookupDecoding`): find the
    most recent earlier occurrence of the last n tokens (n from `max_n` down to `min_n`) in prompt + output and
    propose the tokens that followed it."""

    cost = 0.0  # proposals are free next to a forward pass

    def __init__(self, max_n: int = 3, min_n: int = 1, vocab_size: int | None = None,
                 exclude: frozenset[int] = frozenset()) -> None:
        """`vocab_size`: the target's logit width; `exclude`: placeholder ids (an image's tokens). The prompt may
        hold ids the target cannot emit (Hugging Face's mllama `<|image|>` is 128256, past the 128256 text
        logits; `<|patch|>` runs): a proposal stops before the first of them, so none is ever verified."""
        self.max_n, self.min_n = max_n, min_n
        self.vocab_size, self.exclude = vocab_size, exclude

    def _emittable(self, token: int) -> bool:
        return (self.vocab_size is None or 0 <= token < self.vocab_size) and token not in self.exclude

    def propose(self, context: Sequence[int], n_prompt: int, k: int, sampler: Sampler) -> Proposal:
        tokens = list(context)
        L = len(tokens)
        for n in range(min(self.max_n, L - 1), self.min_n - 1, -1):
            tail = tokens[L - n :]
            for start in range(L - n - 1, -1, -1):  # most recent match first, never the tail itself
                if tokens[start : start + n] == tail:
                    follow = list(itertools.takewhile(self._emittable, tokens[start + n : start + n + k]))
                    if follow:
                        return Proposal(follow)
        return Proposal([])

    def keep(self, n_tokens: int) -> None:
        """The first n_tokens of the context are final (nothing to roll back here)."""


class DraftProposer:
    """A smaller model with the same vocabulary proposes k tokens, one cached forward each, sampled from its
    own processed distribution (the request's sampler over the draft's logits). Its KV cache rolls back to
    the tokens the target kept."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net
        self.cache: KVCache | None = None
        self.cost = 0.5  # draft step time / target step time, measured as it runs (for the choice of k)

    def propose(self, context: Sequence[int], n_prompt: int, k: int, sampler: Sampler) -> Proposal:
        config = self.net.config
        if len(context) + k > config.max_seq_len:
            return Proposal([])
        device = next(self.net.parameters()).device
        if self.cache is None or self.cache.max_len < len(context) + k:
            dtype = next(self.net.parameters()).dtype
            grown = KVCache.for_model(config, 1, max(2 * (len(context) + k), 256),
                                      dtype=dtype if dtype.is_floating_point else torch.float32, device=device)
            self.cache = grown  # recompute from the start: simpler than copying, and rare (doubling)
        ctx = list(context)
        tokens, probs = [], []
        feed = ctx[self.cache.length :]
        for i in range(k):
            logits = self.net(torch.tensor([feed], device=device), cache=self.cache, last_only=True)[:, -1]
            hist = ctx + tokens
            if sampler.params.greedy:
                token = int(sampler(logits, [hist], [hist[n_prompt:]]).tokens[0])
            else:
                q = sampler.probabilities(logits, [hist], [hist[n_prompt:]])
                token = int(torch.multinomial(q, 1, generator=sampler.generator)[0, 0])
                probs.append(q[0])
            tokens.append(token)
            feed = [token]
        return Proposal(tokens, torch.stack(probs) if probs else None)

    def keep(self, n_tokens: int) -> None:
        if self.cache is not None:
            self.cache.length = min(self.cache.length, n_tokens)


Proposer = NgramProposer | DraftProposer


def make_proposer(speculative: str | None = None, draft: nn.Module | None = None,
                  target_vocab: int | None = None, exclude: frozenset[int] = frozenset()) -> Proposer | None:
    """The proposer for `speculative="ngram"` or a draft network (None when neither is asked for). The n-gram
    proposer never proposes ids outside `target_vocab` or in `exclude` (`vision_inputs.placeholder_ids`)."""
    if speculative is not None and speculative != "ngram":
        raise SpeculativeError(f"speculative={speculative!r}: the only mode without a draft model is 'ngram'")
    if draft is not None and speculative is not None:
        raise SpeculativeError("give either a draft model or speculative='ngram', not both")
    if draft is not None:
        if target_vocab is not None and draft.config.vocab_size != target_vocab:
            raise SpeculativeError(f"the draft model's vocabulary has {draft.config.vocab_size} tokens, the target's "
                                   f"{target_vocab}: a draft must share the target's tokenizer")
        return DraftProposer(draft)
    return NgramProposer(vocab_size=target_vocab, exclude=exclude) if speculative == "ngram" else None


def proposer_factory(speculative: str | None = None, draft: nn.Module | None = None,
                     target_vocab: int | None = None,
                     exclude: frozenset[int] = frozenset()) -> Callable[[], Proposer] | None:
    """A maker of one proposer per sequence (the serving engine's), checked now; None when not asked for."""
    if make_proposer(speculative, draft, target_vocab, exclude) is None:
        return None
    return lambda: make_proposer(speculative, draft, target_vocab, exclude)


# --------------------------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------------------------


def accept_probability(p_x: float, q_x: float) -> float:
    """Leviathan et al. 2023, Algorithm 1: keep x ~ q with probability min(1, p(x)/q(x))."""
    return 1.0 if q_x <= p_x else p_x / q_x


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The distribution drawn from after a rejection: norm(max(0, p - q)) (Leviathan et al. 2023, eq. 2)."""
    r = (p - q).clamp(min=0)
    total = r.sum()
    return r / total if total > 0 else p  # p == q never rejects; guard against rounding


@dataclass
class Verified:
    tokens: list[int]  # the kept proposals, then the target's own token
    accepted: int  # how many proposals were kept


def verify(sampler: Sampler, logits: torch.Tensor, context: Sequence[int], n_prompt: int, proposal: Proposal,
           accept: Callable[[float, float], float] = accept_probability,
           resample: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = residual) -> Verified:
    """The tokens the target keeps from `proposal` given its raw logits (k+1, V) at the last context token and
    at each proposal. `accept` and `resample` are the rule (swappable only so a test can show a wrong rule fail)."""
    drafts = proposal.tokens
    hist = list(context)
    out: list[int] = []
    for i in range(len(drafts) + 1):
        row = logits[i : i + 1]
        gen = hist[n_prompt:]
        if sampler.params.greedy:
            token = int(sampler(row, [hist], [gen]).tokens[0])
            if i < len(drafts) and token == drafts[i]:
                out.append(token)
                hist.append(token)
                continue
            return Verified(out + [token], i)
        p = sampler.probabilities(row, [hist], [gen])[0]
        if i == len(drafts):
            return Verified(out + [int(torch.multinomial(p, 1, generator=sampler.generator)[0])], i)
        x = drafts[i]
        q = proposal.probs[i] if proposal.probs is not None else torch.zeros_like(p).index_fill_(0, torch.tensor(x), 1.0)
        u = float(torch.rand((), generator=sampler.generator, device=sampler.generator.device))
        if u < accept(float(p[x]), float(q[x])):
            out.append(x)
            hist.append(x)
            continue
        return Verified(out + [int(torch.multinomial(resample(p, q), 1, generator=sampler.generator)[0])], i)
    raise AssertionError("unreachable")


def token_record(raw: torch.Tensor, token_id: int, sampler: Sampler) -> Token:
    """A `Token` with the log-probabilities the normal path reports (the raw model distribution, as Sampler)."""
    tok = Token(token_id)
    p = sampler.params
    if p.logprobs or p.top_logprobs:
        logp = torch.log_softmax(raw.float(), -1)
        tok.logprob = float(logp[token_id])
        if p.top_logprobs:
            vals, ids = torch.topk(logp, p.top_logprobs)
            tok.top_logprobs = list(zip(ids.tolist(), vals.tolist()))
    return tok


# --------------------------------------------------------------------------------------------------------------
# Adaptive k
# --------------------------------------------------------------------------------------------------------------


class AcceptanceTracker:
    """The running acceptance rate and the number of tokens to propose next.

    With per-token acceptance rate a and a proposal costing c target forwards per token, k proposals yield
    (1 - a^(k+1)) / (1 - a) tokens per (k c + 1) cost (Leviathan et al. 2023, Theorem 3.8); k is the
    maximiser over 1..k_max for the running (exponentially averaged) a.
    """

    def __init__(self, k_max: int, decay: float = 0.8) -> None:
        self.k_max, self.decay = k_max, decay
        self.rate = 0.7  # a prior that lets the first steps propose several tokens
        self.proposed = self.accepted = self.steps = 0

    def update(self, proposed: int, accepted: int) -> None:
        self.steps += 1
        if proposed:
            self.proposed += proposed
            self.accepted += accepted
            self.rate = self.decay * self.rate + (1 - self.decay) * accepted / proposed

    def next_k(self, cost: float) -> int:
        if cost <= 0:
            return self.k_max
        a = min(self.rate, 0.99)
        return max(range(1, self.k_max + 1), key=lambda k: (1 - a ** (k + 1)) / ((1 - a) * (k * cost + 1)))

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


# --------------------------------------------------------------------------------------------------------------
# Generation with speculation (one prompt)
# --------------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def speculative_tokens(net: nn.Module, prompt: Sequence[int], sampler: Sampler, proposer: Proposer, *, k: int = 5,
                       stop_ids: frozenset[int] = frozenset(), context_limit: int | None = None,
                       stats: GenerationStats | None = None,
                       tracker: AcceptanceTracker | None = None,
                       accept: Callable[[float, float], float] = accept_probability,
                       resample: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = residual) -> Iterator[Step]:
    """`generate_tokens` for one prompt with speculation: one `Step` per emitted token, the same stops.

    The prompt goes through the same prefill as plain decoding and the first token comes from its last row, so
    the prompt's keys and the first token are those of `generate_tokens` bit for bit. From then on the cache
    holds every context token but the last; each round feeds that token and the proposals in one forward, keeps
    what verification accepts, and rolls the cache back (`length`) past the rest.
    `tracker` holds the running acceptance rate (read it after the run); `accept`/`resample` as in `verify`.
    """
    if not isinstance(k, int) or not 1 <= k <= 64:
        raise SpeculativeError(f"num_speculative_tokens={k!r}: must be an integer in [1, 64]")
    limit = context_limit or net.config.max_seq_len
    check_context(len(prompt), limit)
    params = sampler.params
    if params.max_tokens == 0:
        return
    tracker = tracker or AcceptanceTracker(k)
    device = next(net.parameters()).device
    dtype = next(net.parameters()).dtype
    budget = limit if params.max_tokens is None else min(limit, len(prompt) + params.max_tokens)
    cache = KVCache.for_model(net.config, 1, min(budget, len(prompt) + 1024) + k + 1,
                              dtype=dtype if dtype.is_floating_point else torch.float32, device=device)
    context = list(prompt)
    n_prompt = len(prompt)
    t0 = time.perf_counter()
    logits = prefill(net, torch.tensor([context], device=device), cache)  # (1, V): the first token's row
    if stats is not None:
        stats.prompt_tokens += n_prompt
        stats.prompt_seconds += time.perf_counter() - t0
    t1 = time.perf_counter()
    proposal = Proposal([])
    try:
        while True:
            result = verify(sampler, logits, context, n_prompt, proposal, accept, resample)
            if proposal.tokens:
                tracker.update(len(proposal.tokens), result.accepted)
            for i, token_id in enumerate(result.tokens):
                tok = token_record(logits[i], token_id, sampler)
                done = token_id in stop_ids
                if done:
                    tok.finish_reason, tok.stop_token = "stop", True
                else:
                    context.append(token_id)
                    if stats is not None:
                        stats.generated_tokens += 1
                    if len(context) >= budget:
                        tok.finish_reason, done = "length", True
                yield Step([token_id], [tok])
                if done:
                    return
            cache.length = len(context) - 1  # roll back: keys of rejected proposals are overwritten next round
            proposer.keep(len(context) - 1)
            room = min(budget - len(context) - 1, tracker.next_k(proposer.cost))
            td = time.perf_counter()
            proposal = proposer.propose(context, n_prompt, room, sampler) if room > 0 else Proposal([])
            tv = time.perf_counter()
            if cache.length + 1 + len(proposal.tokens) > cache.max_len:
                cache.grow(min(2 * cache.max_len, limit + k + 1))
            feed = torch.tensor([[context[-1]] + proposal.tokens], device=device)
            logits = net(feed, cache=cache)[0]  # (1 + k, V)
            if isinstance(proposer, DraftProposer) and proposal.tokens:
                per_draft = (tv - td) / len(proposal.tokens)
                proposer.cost = 0.8 * proposer.cost + 0.2 * per_draft / max(time.perf_counter() - tv, 1e-9)
    finally:
        if stats is not None:
            stats.eval_seconds += time.perf_counter() - t1
