"""Llama Guard over a loaded model: prompt, greedy answer, first-token `unsafe` probability, strict verdict."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..engine.generate import decode_one, prefill
from ..engine.step import check_context
from ..model.cache import KVCache
from . import prompt as lg_prompt
from .prompt import GuardError, Release
from .verdict import Verdict, parse

# The answer is at most "unsafe\n" and a list of codes; 14 codes with commas stay well under this.
MAX_ANSWER_TOKENS = 48


def detect_release(model) -> Release:
    """The release whose official chat template the checkpoint carries (explicit metadata, never its path)."""
    template = getattr(model.checkpoint, "chat_template", None) or ""
    if "Provide your safety assessment" in template and "<|header_start|>" in template:
        return lg_prompt.release("llama-guard-4-12b")
    if "excluded_category_keys" in template:  # the 3 1B / 3 11B Vision template (identical texts)
        return lg_prompt.release("llama-guard-3-1b")
    if "S14: Code Interpreter Abuse." in template and "Provide your safety assessment" in template:
        return lg_prompt.release("llama-guard-3-8b")
    raise GuardError(f"{model.checkpoint.source}: this checkpoint carries no Llama Guard chat template, so its "
                     f"release is unknown; pass release= one of {', '.join(lg_prompt.RELEASES)} "
                     "(herd guard --release)")


def restrict_to_role(messages: Sequence[Mapping], role: str | None) -> list[Mapping]:
    """The conversation up to the last message of `role` ('user' or 'assistant'/'agent'); None keeps it all."""
    messages = list(messages)
    if role is None:
        return messages
    want = {"user": "user", "assistant": "assistant", "agent": "assistant"}.get(str(role).lower())
    if want is None:
        raise GuardError(f"role={role!r}: give 'user' (check the input) or 'assistant' (check the answer)")
    for end in range(len(messages), 0, -1):
        if isinstance(messages[end - 1], Mapping) and messages[end - 1].get("role") == want:
            return messages[:end]
    raise GuardError(f"role={role!r}: the conversation has no {want} message to assess")


class LlamaGuard:
    """A Llama Guard model ready to moderate conversations."""

    def __init__(self, model, release: str | Release | None = None, *,
                 categories: Mapping[str, str] | None = None, excluded: Sequence[str] = (),
                 threshold: float | None = None) -> None:
        if model.tokenizer is None:
            raise GuardError(f"{model.checkpoint.source}: Llama Guard needs the checkpoint's tokenizer")
        self.model = model
        self.release = release if isinstance(release, Release) else (
            lg_prompt.release(release) if release else detect_release(model))
        self.categories = categories
        self.excluded = tuple(excluded)
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise GuardError(f"threshold={threshold!r}: give a probability between 0 and 1")
        self.threshold = threshold
        tok = model.tokenizer
        unsafe = tok.encode("unsafe")
        if len(unsafe) != 1:
            raise GuardError(f"{model.checkpoint.source}: 'unsafe' is {len(unsafe)} tokens in this tokenizer; "
                             "Llama Guard's first-token score needs it to be one (is this a Llama Guard model?)")
        self.unsafe_id = unsafe[0]
        self.stop_ids = frozenset(model.generation_defaults.eos_token_ids or ()) | tok.stop_ids

    def encode(self, messages: Sequence[Mapping], categories: Mapping[str, str] | None = None,
               excluded: Sequence[str] | None = None) -> list[int]:
        return lg_prompt.encode(self.model.tokenizer, self.release, messages,
                                self.categories if categories is None else categories,
                                self.excluded if excluded is None else excluded)

    def moderate(self, messages: Sequence[Mapping], role: str | None = None, *,
                 categories: Mapping[str, str] | None = None, excluded: Sequence[str] | None = None,
                 threshold: float | None = None) -> Verdict:
        """Assess the last message (of `role`, when given) of an OpenAI-shaped conversation."""
        messages = restrict_to_role(messages, role)
        cats = self.categories if categories is None else categories
        excl = self.excluded if excluded is None else excluded
        has_image = any(isinstance(m.get("content"), list) and any(isinstance(p, Mapping) and p.get("type") == "image"
                                                                   for p in m["content"]) for m in messages)
        if has_image:  # the prompt renders image tokens, but no image reaches the model: refuse, never guess
            raise GuardError("image parts: moderating images is not supported yet (the prompt with its image "
                             "tokens can be shown with `herd guard --show-prompt`); give text parts only")
        names = lg_prompt.categories_for(self.release, cats, excl)
        ids = self.encode(messages, cats, excl)
        text, score = self.answer(ids)
        status, codes = parse(text, known=names)
        return Verdict(status, codes, score, text, self.threshold if threshold is None else threshold,
                       {c: names[c] for c in codes})

    def answer(self, ids: Sequence[int]) -> tuple[str, float | None]:
        """Greedy answer text and P(first word = 'unsafe'), read at the first step that is not whitespace."""
        out, score = greedy_answer(self.model, ids, MAX_ANSWER_TOKENS, self.stop_ids, self.unsafe_id)
        return self.model.tokenizer.decode(out), score


@torch.inference_mode()
def greedy_answer(model, ids: Sequence[int], max_tokens: int, stop_ids: frozenset[int],
                  score_id: int) -> tuple[list[int], float | None]:
    """Up to `max_tokens` greedy tokens after `ids` (prefill, then one cached step per token), and the
    probability of `score_id` at the first step whose pick is not whitespace (or a stop)."""
    net, tok = model.net, model.tokenizer
    limit = model.context_limit()
    check_context(len(ids), limit, "the guard model's context window")
    device = model.device
    dtype = next(net.parameters()).dtype
    steps = min(max_tokens, limit - len(ids))
    cache = KVCache.for_model(net.config, 1, len(ids) + steps,
                              dtype=dtype if dtype.is_floating_point else torch.float32, device=device)
    logits = prefill(net, torch.tensor([list(ids)], device=device), cache)[0]
    out: list[int] = []
    score: float | None = None
    for step in range(steps):
        pick = int(logits.argmax())
        if score is None and (pick in stop_ids or tok.decode([pick]).strip()):
            score = float(torch.softmax(logits.float(), -1)[score_id])
        if pick in stop_ids:
            break
        out.append(pick)
        if step + 1 < steps:
            logits = decode_one(net, torch.tensor([pick], device=device), cache)[0]
    return out, score
