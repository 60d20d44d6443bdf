"""Llama Guard over a loaded model: prompt (images bound for 3 11B Vision), greedy answer, first-token `unsafe`
probability, strict verdict."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..engine.generate import decode_one, prefill
from ..engine.step import check_context
from ..model.cache import KVCache
from ..vision_inputs import bind_images, message_images
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
        vision = getattr(model.config, "vision", None) is not None  # 3 11B Vision: an mllama checkpoint
        return lg_prompt.release("llama-guard-3-11b-vision" if vision else "llama-guard-3-1b")
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
        messages, images = image_inputs(restrict_to_role(messages, role))
        cats = self.categories if categories is None else categories
        excl = self.excluded if excluded is None else excluded
        if images and self.release.llama4:  # its <|image|> expands to a patch layout the prompt code lacks
            raise GuardError("image parts: moderating images with Llama Guard 4 is not supported yet; give text "
                             "parts only, or use Llama Guard 3 11B Vision")
        if len(images) > 1:
            raise GuardError(f"{len(images)} images: Llama Guard 3 Vision's template places one <|image|> per "
                             "conversation; moderate one image at a time")
        names = lg_prompt.categories_for(self.release, cats, excl, has_image=bool(images))
        ids = self.encode(messages, cats, excl)
        text, score = self.answer(ids, images)
        status, codes = parse(text, known=names)
        return Verdict(status, codes, score, text, self.threshold if threshold is None else threshold,
                       {c: names[c] for c in codes})

    def answer(self, ids: Sequence[int], images: Sequence = ()) -> tuple[str, float | None]:
        """Greedy answer text and P(first word = 'unsafe'), read at the first step that is not whitespace.
        `images` stand for the prompt's <|image|> token (bound to the model as `Model.chat` binds them)."""
        net = bind_images(self.model.net, self.model.tokenizer, list(ids), list(images)) if images else None
        out, score = greedy_answer(self.model, ids, MAX_ANSWER_TOKENS, self.stop_ids, self.unsafe_id, net=net)
        return self.model.tokenizer.decode(out), score


def image_inputs(messages: Sequence[Mapping]) -> tuple[list[Mapping], list]:
    """The conversation with OpenAI's `image_url` parts written as the template's `{"type": "image"}` parts, and
    the images' sources in order (`vision_inputs.message_images`: data: URLs, paths, bytes, PIL images; an image
    part without its image is an ImageError, never a prompt with an image token and no image)."""
    images = message_images([dict(m) for m in messages if isinstance(m, Mapping)])
    out = []
    for m in messages:
        content = m.get("content") if isinstance(m, Mapping) else None
        if isinstance(content, list):
            m = {**m, "content": [{"type": "image"} if isinstance(p, Mapping) and p.get("type") == "image_url"
                                  else p for p in content]}
        out.append(m)
    return out, images


@torch.inference_mode()
def greedy_answer(model, ids: Sequence[int], max_tokens: int, stop_ids: frozenset[int],
                  score_id: int, net=None) -> tuple[list[int], float | None]:
    """Up to `max_tokens` greedy tokens after `ids` (prefill, then one cached step per token), and the
    probability of `score_id` at the first step whose pick is not whitespace (or a stop). `net`: the model's
    network with a request's images bound (`vision_inputs.bind_images`), when there are any."""
    net, tok = model.net if net is None else net, model.tokenizer
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
