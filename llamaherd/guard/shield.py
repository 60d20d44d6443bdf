"""Shields for serving: Llama Guard (and Prompt Guard) checks of a request's input and of the reply, with counters.

The server calls `check_input` before generating and `check_reply` on the reply (on the growing text every
`stream_every` tokens when streaming), off the event loop. A `BatchedLlamaGuard` (guard/batched.py, what
`herd serve --guard` uses) takes concurrent checks at once and batches them on its engine; a plain `LlamaGuard`
and Prompt Guard run one check at a time under a lock. Verdicts are counted per category for the metrics route.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .llama_guard import LlamaGuard
from .prompt import GuardError
from .prompt_guard import SHIELD_MODES, SHIELD_THRESHOLD, PromptGuard
from .verdict import Verdict

# OpenAI moderation category names for each Llama Guard 3 hazard code (MLCommons taxonomy, as named in the
# Llama Guard 3 model card). Codes without an OpenAI counterpart (S6 Specialized Advice, S7 Privacy,
# S8 Intellectual Property, S13 Elections) map to nothing: they still flag, and are reported under their own code.
OPENAI_CATEGORIES: dict[str, tuple[str, ...]] = {
    "S1": ("violence", "illicit/violent"),  # Violent Crimes
    "S2": ("illicit",),  # Non-Violent Crimes
    "S3": ("sexual", "illicit"),  # Sex Crimes
    "S4": ("sexual/minors",),  # Child Exploitation
    "S5": ("harassment",),  # Defamation
    "S6": (),  # Specialized Advice
    "S7": (),  # Privacy
    "S8": (),  # Intellectual Property
    "S9": ("violence", "illicit/violent"),  # Indiscriminate Weapons
    "S10": ("hate",),  # Hate
    "S11": ("self-harm",),  # Self-Harm
    "S12": ("sexual",),  # Sexual Content
    "S13": (),  # Elections
    "S14": ("illicit",),  # Code Interpreter Abuse
}
OPENAI_NAMES = ("harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
                "self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "sexual/minors", "violence",
                "violence/graphic")


def openai_result(verdict: Verdict, input_types: Sequence[str] = ("text",)) -> dict:
    """One OpenAI moderation result: flagged, categories, category_scores (P(unsafe) on the named categories);
    `input_types`: what the input held ("text", "image"), reported for each category hit."""
    hit = {name for code in verdict.categories for name in OPENAI_CATEGORIES.get(code, ())}
    score = verdict.score if verdict.score is not None else (1.0 if verdict.flagged else 0.0)
    return {
        "flagged": verdict.flagged,
        "categories": {name: name in hit for name in OPENAI_NAMES},
        "category_scores": {name: (score if name in hit else 0.0) for name in OPENAI_NAMES},
        "category_applied_input_types": {name: (list(input_types) if name in hit else []) for name in OPENAI_NAMES},
        # Llama Guard's own answer, for categories OpenAI has no name for and for unparsed answers.
        "llama_guard": verdict.as_dict(),
    }


@dataclass
class ShieldResult:
    """Whether a text passes, and why not: the Llama Guard verdict and/or the Prompt Guard label."""

    allowed: bool
    verdict: Verdict | None = None
    prompt_label: str | None = None
    prompt_score: float | None = None

    def reason(self) -> str:
        if self.verdict is not None and self.verdict.flagged:
            codes = ", ".join(f"{c} {self.verdict.names.get(c, '')}".strip() for c in self.verdict.categories)
            return f"Llama Guard: {self.verdict.status}" + (f" ({codes})" if codes else "")
        if self.prompt_label is not None:
            return f"Prompt Guard: {self.prompt_label} ({self.prompt_score:.3f})"
        return "allowed"


@dataclass
class Shields:
    """What `herd serve --guard ... [--prompt-guard ...]` checks, and how it refuses."""

    guard: LlamaGuard | None = None
    prompt_guard: PromptGuard | None = None
    # Prompt Guard: refuse when the mode's score of the last user text is above the threshold, as Meta's shield
    # does (PromptScores.shield_score: "injection" = 1 - P(benign), "jailbreak" = P(JAILBREAK); threshold 0.9).
    prompt_threshold: float = SHIELD_THRESHOLD
    prompt_mode: str = "injection"
    on_input: str = "content_filter"  # or "error": a 400 instead of an empty content_filter answer
    screen_input: bool = True  # check the request before generating (a field, not the method check_input)
    screen_output: bool = True  # check the reply
    stream_every: int = 16  # tokens between checks of a streamed reply
    allow_opt_out: bool = False  # may a request skip the shields ("guard": false)?
    counts: Counter = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _count_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.prompt_mode not in SHIELD_MODES:
            raise GuardError(f"prompt guard mode {self.prompt_mode!r}: give one of {', '.join(SHIELD_MODES)}")

    def _guard_lock(self):
        """The lock around a Llama Guard call, or none when the guard batches concurrent calls itself."""
        return contextlib.nullcontext() if getattr(self.guard, "concurrent", False) else self._lock

    def _count(self, where: str, result: ShieldResult) -> None:
        with self._count_lock:  # checks finish on many threads at once
            if result.verdict is not None:
                v = result.verdict
                self.counts[(where, v.status)] += 1
                for code in v.categories:
                    self.counts[(where, code)] += 1
            if result.prompt_label is not None:
                self.counts[(where, f"prompt_guard:{result.prompt_label}")] += 1

    def check_input(self, messages: Sequence[Mapping]) -> ShieldResult:
        """The conversation so far, its last user turn assessed (blocking: call it off the event loop)."""
        convo = _guardable(messages)
        result = ShieldResult(True)
        if not self.screen_input:
            return result
        with self._lock:
            if self.prompt_guard is not None and convo:
                scores = self.prompt_guard.classify(_text(convo[-1]))
                score = scores.shield_score(self.prompt_mode)
                result.prompt_label, result.prompt_score = scores.label, score
                if score > self.prompt_threshold:
                    result.allowed = False
        if self.guard is not None and convo and result.allowed:
            with self._guard_lock():
                result.verdict = self.guard.moderate(convo, role="user")
            result.allowed = not result.verdict.flagged
        self._count("input", result)
        return result

    def check_reply(self, messages: Sequence[Mapping], reply: str) -> ShieldResult:
        """The assistant's reply (possibly partial) after the conversation."""
        if self.guard is None or not self.screen_output:
            return ShieldResult(True)
        convo = _guardable(messages)
        while convo and convo[-1]["role"] == "assistant":
            convo.pop()
        with self._guard_lock():
            verdict = self.guard.moderate([*convo, {"role": "assistant", "content": reply}])
        result = ShieldResult(not verdict.flagged, verdict)
        self._count("output", result)
        return result

    def moderate(self, messages: Sequence[Mapping]) -> Verdict:
        """Llama Guard's verdict on a conversation, for /v1/moderations."""
        with self._guard_lock():
            verdict = self.guard.moderate(messages)
        self._count("moderations", ShieldResult(not verdict.flagged, verdict))
        return verdict

    def metrics(self) -> dict[str, dict[str, int]]:
        """Verdict counts per check ("input", "output", "moderations"): by status and by category code."""
        out: dict[str, dict[str, int]] = {"input": {}, "output": {}, "moderations": {}}
        with self._count_lock:
            counts = sorted(self.counts.items())
        for (where, key), n in counts:
            out[where][key] = n
        return out

    def prometheus(self) -> str:
        """The counts in Prometheus' text format (served at /guard/metrics)."""
        lines = ["# HELP llamaherd_guard_verdicts_total Guard verdicts by check and status or category.",
                 "# TYPE llamaherd_guard_verdicts_total counter"]
        for where, counts in self.metrics().items():
            for key, n in counts.items():
                label = "category" if key.startswith("S") or key.startswith("prompt_guard:") else "status"
                lines.append(f'llamaherd_guard_verdicts_total{{check="{where}",{label}="{key}"}} {n}')
        return "\n".join(lines) + "\n"


def _text(message: Mapping) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
    return ""


def _guardable(messages: Sequence[Mapping]) -> list[dict]:
    """The user/assistant turns as Llama Guard reads them: system and tool turns dropped, tool-call-only
    assistant turns dropped, consecutive turns of one role merged so that roles alternate from a user turn."""
    out: list[dict] = []
    for m in messages:
        role = m.get("role")
        if role not in ("user", "assistant"):
            continue
        text = _text(m)
        if role == "assistant" and not text:
            continue
        if out and out[-1]["role"] == role:
            out[-1]["content"] += "\n\n" + text
        elif out or role == "user":
            out.append({"role": role, "content": text})
    return out
