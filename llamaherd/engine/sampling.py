"""Sampling controls (`SamplingParams`) and the composed sampler that turns (B, V) logits into next tokens.

A sampler is a list of transforms applied in order to a (B, V) float32 logits tensor (mlx-lm `make_sampler`
style), then one draw. Order, as vLLM's sampler and HF's `generate` apply them:

    repetition penalty -> presence/frequency penalties -> logit bias      (on raw logits; also under greedy)
    temperature -> top-k -> typical-p -> top-p -> min-p                    (filters on the tempered distribution)
    argmax when temperature == 0, else one multinomial draw from a per-request torch.Generator

Filtered-out tokens get logit -inf, so every transform's output is again logits and each can be tested on its own.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from ..errors import LlamaherdError


class SamplingError(LlamaherdError, ValueError):
    """A sampling parameter is out of range or of the wrong type."""


# --------------------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingParams:
    """What to generate and how to pick each token. Every field validated in `__post_init__`.

    Neutral values disable a control: top_k=0, top_p=1, min_p=0, typical_p=1, penalties 1 / 0.
    """

    max_tokens: int | None = 256  # None: until a stop or the context window is full
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens (0 = off)
    top_p: float = 1.0  # nucleus: smallest set whose probability reaches top_p (Holtzman et al. 2019)
    min_p: float = 0.0  # keep tokens with p >= min_p * p_max (llama.cpp / vLLM min-p)
    typical_p: float = 1.0  # locally typical sampling (Meister et al. 2022; HF TypicalLogitsWarper)
    repetition_penalty: float = 1.0  # CTRL (Keskar et al. 2019), as HF / llama.cpp: seen logits /p if > 0 else *p
    penalty_last_n: int | None = None  # window of the repetition penalty: None = whole context, n = last n tokens
    presence_penalty: float = 0.0  # OpenAI: logit -= presence * [count > 0], over generated tokens
    frequency_penalty: float = 0.0  # OpenAI: logit -= frequency * count, over generated tokens
    logit_bias: Mapping[int, float] = field(default_factory=dict)  # token id -> added to its logit (OpenAI)
    seed: int | None = None  # same seed -> same output; None draws a fresh seed per request
    stop: tuple[str, ...] = ()  # stop strings: generation ends before them, they are never emitted
    stop_token_ids: tuple[int, ...] = ()  # extra end tokens, on top of the model's own
    ignore_eos: bool = False  # keep going past the model's end tokens (benchmarks)
    logprobs: bool = False  # report the chosen token's log-probability (raw model distribution)
    top_logprobs: int = 0  # ... and this many most likely alternatives

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> SamplingError:
            return SamplingError(f"sampling parameter {name}={getattr(self, name)!r}: {why}")

        # Normalise container fields so the dataclass stays hashable and immutable.
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        object.__setattr__(self, "stop", tuple(stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in (self.stop_token_ids or ())))
        try:
            bias = {int(k): float(v) for k, v in dict(self.logit_bias or {}).items()}
        except (TypeError, ValueError):
            raise bad("logit_bias", "must map integer token ids to numbers, e.g. {1234: -100}") from None
        object.__setattr__(self, "logit_bias", _FrozenDict(bias))

        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 0):
            raise bad("max_tokens", "must be a non-negative integer or None")
        if not _finite(self.temperature) or self.temperature < 0:
            raise bad("temperature", "must be >= 0 (0 means greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "must be a non-negative integer (0 disables it)")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1] (1 disables it)")
        if not _finite(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1] (0 disables it)")
        if not _finite(self.typical_p) or not 0 < self.typical_p <= 1:
            raise bad("typical_p", "must be in (0, 1] (1 disables it)")
        if not _finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be > 0 (1 disables it)")
        if self.penalty_last_n is not None and (not isinstance(self.penalty_last_n, int) or self.penalty_last_n < 0):
            raise bad("penalty_last_n", "must be a non-negative integer or None (whole context)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not _finite(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                raise bad(name, "must be in [-2, 2] (OpenAI's range; 0 disables it)")
        if any(not _finite(v) for v in bias.values()):
            raise bad("logit_bias", "biases must be finite numbers")
        if self.seed is not None and (not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**64):
            raise bad("seed", "must be an integer in [-2**63, 2**64) or None")  # torch.Generator.manual_seed's range
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must be non-empty strings")
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= 20:
            raise bad("top_logprobs", "must be an integer in [0, 20]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **changes: Any) -> SamplingParams:
        return replace(self, **changes)

    @classmethod
    def from_kwargs(cls, defaults: Any = None, **kwargs: Any) -> SamplingParams:
        """Params from keyword arguments over a checkpoint's `GenerationDefaults` (HF generation_config.json).

        Unknown names raise with the list of known ones. Aliases users bring from other tools are accepted:
        `max_new_tokens`/`num_predict` (HF/Ollama) for max_tokens, `repeat_penalty` and `repeat_last_n`
        (llama.cpp/Ollama), `stop_sequences` for stop.
        """
        aliases = {"max_new_tokens": "max_tokens", "num_predict": "max_tokens", "repeat_penalty": "repetition_penalty",
                   "repeat_last_n": "penalty_last_n", "stop_sequences": "stop"}
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        if defaults is not None:
            for name in ("temperature", "top_p", "top_k"):
                v = getattr(defaults, name, None)
                if v is not None:
                    values[name] = v
        for key, v in kwargs.items():
            name = aliases.get(key, key)
            if name not in known:
                raise SamplingError(f"unknown sampling parameter {key!r}; known: {', '.join(sorted(known))}")
            if v is None and name not in ("max_tokens", "seed", "penalty_last_n"):
                continue  # None means "not given": keep the default
            values[name] = v
        if values.get("max_tokens") == -1:  # Ollama's num_predict=-1: no limit
            values["max_tokens"] = None
        if values.get("penalty_last_n") == -1:  # llama.cpp's repeat_last_n=-1: the whole context
            values["penalty_last_n"] = None
        return cls(**values)


class _FrozenDict(dict):
    """A read-only, hashable dict for `SamplingParams.logit_bias`."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def _readonly(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("SamplingParams.logit_bias is read-only; use params.replace(logit_bias=...)")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _readonly  # type: ignore[assignment]


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# --------------------------------------------------------------------------------------------------------------
# Transforms over (B, V) logits. Each returns new logits; removed tokens are -inf.
# --------------------------------------------------------------------------------------------------------------

Transform = Callable[[torch.Tensor], torch.Tensor]


def token_counts(histories: Sequence[Sequence[int]], vocab_size: int,
                 device: torch.device | None = None) -> torch.Tensor:
    """(B, V) float counts of each token id in each row's history. Ids past the vocabulary (Llama 3.2 Vision's
    <|image|>, 128256 in Hugging Face tokenizers: an input-only embedding, never sampled) are not counted."""
    counts = torch.zeros(len(histories), vocab_size, device=device)
    for row, ids in enumerate(histories):
        if len(ids):
            idx = torch.as_tensor(list(ids), dtype=torch.long, device=device)
            idx = idx[(idx >= 0) & (idx < vocab_size)]
            counts[row].index_add_(0, idx, torch.ones(len(idx), device=device))
    return counts


# Within these, dividing (or multiplying) logits by a temperature or penalty cannot overflow float32 for any
# logit a model produces (|logit| < 1e8); outside them the transforms take their NaN-free path.
SAFE_DIVISORS = (1e-30, 1e30)


def apply_repetition_penalty(logits: torch.Tensor, counts: torch.Tensor, penalty: float) -> torch.Tensor:
    """Seen tokens: positive logits divided by `penalty`, negative ones multiplied (HF RepetitionPenalty,
    llama.cpp `llama_sampler_penalties`), so a penalty > 1 always makes them less likely."""
    seen = counts > 0
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    if not SAFE_DIVISORS[0] <= penalty <= SAFE_DIVISORS[1]:
        # a penalty at the float range's edge (1e308 is inf in float32: 0 * inf is NaN; 1e-300 overflows the
        # quotients): clamped into the dtype's range, and the results to its finite values
        info = torch.finfo(logits.dtype)
        p = min(max(penalty, info.tiny), info.max)
        penalised = torch.where(logits > 0, logits / p, logits * p).clamp(-info.max, info.max)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency(logits: torch.Tensor, counts: torch.Tensor, presence: float,
                             frequency: float) -> torch.Tensor:
    """OpenAI's formula: mu[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty."""
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def apply_logit_bias(logits: torch.Tensor, bias: Mapping[int, float]) -> torch.Tensor:
    ids = torch.tensor(list(bias), dtype=torch.long, device=logits.device)
    vals = torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
    out = logits.clone()
    out[:, ids] += vals
    return out


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature. A temperature at the edge of the float range (1e308 is inf in float32, and
    -inf / inf is NaN; 1e-320 makes every quotient overflow) divides the row shifted by its maximum instead,
    by the temperature clamped into the dtype's range: softmax is unchanged by the shift, every filtered -inf stays
    -inf, and the result is NaN-free (a huge temperature: uniform over the surviving tokens; a tiny one: argmax)."""
    if SAFE_DIVISORS[0] <= temperature <= SAFE_DIVISORS[1]:
        return logits / temperature
    info = torch.finfo(logits.dtype)
    top = logits.amax(dim=-1, keepdim=True)
    shifted = logits - torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return shifted / min(max(temperature, info.tiny), info.max)



def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties with the k-th are kept, as HF TopKLogitsWarper)."""
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability sum reaches p (the token that crosses
    p is kept; at least one token always survives)."""
    probs_sorted, order = torch.sort(torch.softmax(logits, -1), dim=-1, descending=True)
    mass_before = torch.cumsum(probs_sorted, -1) - probs_sorted  # probability of strictly more likely tokens
    remove_sorted = mass_before >= p
    remove_sorted[:, 0] = False
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p times the most likely token's."""
    probs = torch.softmax(logits, -1)
    threshold = min_p * probs.max(-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_typical_p(logits: torch.Tensor, mass: float) -> torch.Tensor:
    """Locally typical sampling (Meister et al. 2022, "Typical Decoding for Natural Language Generation").

    Rank tokens by |-log p - H| (distance of their surprisal from the entropy H), then keep the smallest
    prefix of that ranking whose probability reaches `mass`, the token that crosses included.
    """
    logp = torch.log_softmax(logits, -1)
    p = logp.exp()
    entropy = -torch.nansum(p * logp, -1, keepdim=True)  # nansum: -inf * 0 from removed tokens
    distance = (-logp - entropy).abs()
    distance = distance.masked_fill(torch.isinf(logp), float("inf"))  # removed tokens rank last
    dist_sorted, order = torch.sort(distance, dim=-1)
    probs_sorted = p.gather(-1, order)
    mass_before = torch.cumsum(probs_sorted, -1) - probs_sorted
    remove_sorted = mass_before >= mass
    remove_sorted[:, 0] = False
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


# --------------------------------------------------------------------------------------------------------------
# The composed sampler
# --------------------------------------------------------------------------------------------------------------


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # (B,) chosen ids
    logprobs: torch.Tensor | None = None  # (B,) log-probability of each chosen id under the raw model
    top_ids: torch.Tensor | None = None  # (B, k) most likely alternatives
    top_logprobs: torch.Tensor | None = None  # (B, k)


class Sampler:
    """`params` made executable for one request: logits (B, V) + token histories -> next tokens.

    Histories are per row: `context` (prompt and generated so far, for the repetition penalty) and
    `generated` (for OpenAI's presence/frequency penalties, which count output tokens only, as vLLM).
    """

    def __init__(self, params: SamplingParams, vocab_size: int, device: torch.device | str | None = None) -> None:
        bad = [t for t in params.logit_bias if not 0 <= t < vocab_size]
        if bad:
            raise SamplingError(f"logit_bias names token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")
        self.params = params
        self.vocab_size = vocab_size
        seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)
        self.generator = torch.Generator(device=device or "cpu").manual_seed(seed)

    def logit_transforms(self, context: Sequence[Sequence[int]], generated: Sequence[Sequence[int]],
                         device: torch.device) -> list[Transform]:
        """Penalties and bias: applied to raw logits, under greedy too."""
        p = self.params
        out: list[Transform] = []
        if p.repetition_penalty != 1.0:
            n = p.penalty_last_n
            window = context if n is None else [list(ids)[-n:] if n else [] for ids in context]
            counts = token_counts(window, self.vocab_size, device)
            out.append(lambda x: apply_repetition_penalty(x, counts, p.repetition_penalty))
        if p.presence_penalty or p.frequency_penalty:
            gen_counts = token_counts(generated, self.vocab_size, device)
            out.append(lambda x: apply_presence_frequency(x, gen_counts, p.presence_penalty, p.frequency_penalty))
        if p.logit_bias:
            out.append(lambda x: apply_logit_bias(x, p.logit_bias))
        return out

    def filter_transforms(self) -> list[Transform]:
        """Temperature and truncation: shape the distribution that is drawn from."""
        p = self.params
        out: list[Transform] = []
        if p.temperature != 1.0:
            out.append(lambda x: apply_temperature(x, p.temperature))
        if p.top_k:
            out.append(lambda x: apply_top_k(x, p.top_k))
        if p.typical_p < 1.0:
            out.append(lambda x: apply_typical_p(x, p.typical_p))
        if p.top_p < 1.0:
            out.append(lambda x: apply_top_p(x, p.top_p))
        if p.min_p > 0.0:
            out.append(lambda x: apply_min_p(x, p.min_p))
        return out

    def probabilities(self, logits: torch.Tensor, context: Sequence[Sequence[int]] = (),
                      generated: Sequence[Sequence[int]] = ()) -> torch.Tensor:
        """The (B, V) distribution a non-greedy draw samples from."""
        x = logits.float()
        B = x.shape[0]
        for t in self.logit_transforms(context or [[]] * B, generated or [[]] * B, x.device):
            x = t(x)
        for t in self.filter_transforms():
            x = t(x)
        return torch.softmax(x, -1)

    def __call__(self, logits: torch.Tensor, context: Sequence[Sequence[int]] = (),
                 generated: Sequence[Sequence[int]] = ()) -> SampleOutput:
        raw = logits.float()
        B = raw.shape[0]
        x = raw
        for t in self.logit_transforms(context or [[]] * B, generated or [[]] * B, x.device):
            x = t(x)
        if self.params.greedy:
            tokens = x.argmax(-1)
        else:
            for t in self.filter_transforms():
                x = t(x)
            probs = torch.softmax(x, -1)
            tokens = torch.multinomial(probs, 1, generator=self.generator)[:, 0]
        out = SampleOutput(tokens)
        if self.params.logprobs or self.params.top_logprobs:
            # OpenAI / vLLM report log-probabilities of the model's own distribution, before sampling controls.
            logp = torch.log_softmax(raw, -1)
            out.logprobs = logp.gather(-1, tokens[:, None])[:, 0]
            if self.params.top_logprobs:
                out.top_logprobs, out.top_ids = torch.topk(logp, self.params.top_logprobs, dim=-1)
        return out


def make_sampler(params: SamplingParams, vocab_size: int, device: torch.device | str | None = None) -> Sampler:
    return Sampler(params, vocab_size, device)


def resolve_stop_ids(params: SamplingParams, tokenizer: Any = None, defaults: Any = None,
                     extra: Iterable[int] = ()) -> frozenset[int]:
    """Every id that ends generation: the request's own, plus (unless ignore_eos) the tokenizer's end-of-turn
    tokens, its eos, and the checkpoint's generation_config eos list."""
    ids = set(params.stop_token_ids) | set(extra)
    if not params.ignore_eos:
        if tokenizer is not None:
            ids |= set(getattr(tokenizer, "stop_ids", ()) or ())
            eos = getattr(tokenizer, "eos_id", None)
            if eos is not None:
                ids.add(eos)
        if defaults is not None:
            ids |= set(getattr(defaults, "eos_token_ids", ()) or ())
    return frozenset(ids)
