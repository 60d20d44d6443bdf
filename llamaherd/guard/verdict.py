"""Llama Guard's answer read strictly: 'safe', or 'unsafe' and a line of category codes; anything else is unparsed."""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field

_CODE = re.compile(r"[A-Za-z]+[0-9]+")


@dataclass(frozen=True)
class Verdict:
    """One Llama Guard decision.

    `status` is "safe", "unsafe" or "unparsed" (the model wrote something that is neither answer: never guessed).
    `score` is the probability of `unsafe` as the first word of the answer (model card: first-token probability
    used as the unsafe-class probability); `flagged` is the decision, from the score when a threshold is set.
    """

    status: str
    categories: tuple[str, ...] = ()
    score: float | None = None
    raw: str = ""
    threshold: float | None = None
    names: dict[str, str] = field(default_factory=dict)  # code -> category name, for the codes in `categories`

    @property
    def flagged(self) -> bool:
        if self.threshold is not None and self.score is not None:
            return self.score >= self.threshold
        return self.status != "safe"  # unparsed counts as flagged: a guard that cannot be read does not pass

    @property
    def safe(self) -> bool:
        return not self.flagged

    def as_dict(self) -> dict:
        return {"status": self.status, "flagged": self.flagged, "categories": list(self.categories),
                "category_names": [self.names.get(c, c) for c in self.categories], "score": self.score,
                "raw": self.raw}


def parse(text: str, known: Collection[str] | None = None) -> tuple[str, tuple[str, ...]]:
    """('safe', ()), ('unsafe', codes) or ('unparsed', ()) from the generated answer.

    Whitespace around lines and codes is tolerated ("\\n\\nunsafe\\n S1, S10 \\n"); codes must look like S<n>
    and, when `known` is given, be among the prompt's categories. `unsafe` without a code line is accepted
    (the model card's format makes the second line conditional on the first) with no categories.
    """
    lines = [ln.strip() for ln in text.strip().splitlines()]
    lines = [ln for ln in lines if ln]
    if lines == ["safe"]:
        return "safe", ()
    if not lines or lines[0] != "unsafe" or len(lines) > 2:
        return "unparsed", ()
    if len(lines) == 1:
        return "unsafe", ()
    codes = tuple(c.strip() for c in lines[1].split(","))
    if not all(_CODE.fullmatch(c) for c in codes) or len(set(codes)) != len(codes):
        return "unparsed", ()
    if known is not None and any(c not in known for c in codes):
        return "unparsed", ()
    return "unsafe", codes
