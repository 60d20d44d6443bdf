"""Prompt Guard 1 and 2: a Hugging Face DeBERTa classifier folder loaded strictly, and long texts scanned in windows.

Prompt Guard (86M) labels BENIGN / INJECTION / JAILBREAK; Prompt Guard 2 (86M, 22M) labels BENIGN / MALICIOUS.
Label 0 is the benign class in both (their config.json id2label). A text longer than the model's window is
classified in overlapping windows, batched, and the window with the highest non-benign probability decides,
as Meta's guidance for long inputs does (PurpleLlama Prompt-Guard model card, "split into segments and scan
each in parallel"; its inference utilities take the maximum score over segments).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from ..checkpoint.hf import load_safetensors
from ..checkpoint.meta_pth import load_pth
from ..errors import CheckpointError, TokenizerError
from ..model.deberta import DebertaConfig, DebertaForSequenceClassification
from .prompt import GuardError

ARCHITECTURES = ("DebertaV2ForSequenceClassification",)
# Prompt Guard 2's two classes, label 0 benign and label 1 malicious (PurpleLlama, Llama-Prompt-Guard-2/86M/
# MODEL_CARD.md: "labeling prompts as 'benign' or 'malicious'"; its example prints MALICIOUS for class 1). A
# checkpoint whose config.json carries only transformers' placeholders LABEL_0 / LABEL_1 is read with these.
PROMPT_GUARD_2_LABELS = ("BENIGN", "MALICIOUS")
# Meta's Prompt Guard shield (llama-stack, inline prompt_guard provider): mode "injection" (config default) or
# "jailbreak", a violation when the mode's score is strictly above the threshold, 0.9 by default.
SHIELD_MODES = ("injection", "jailbreak")
SHIELD_THRESHOLD = 0.9


@dataclass(frozen=True)
class PromptScores:
    """Label -> probability for one text, from its highest-scoring window; `window` is that window's index."""

    scores: dict[str, float]
    label: str
    windows: int
    window: int

    @property
    def malicious(self) -> float:
        """Probability of any non-benign label (label 0 is benign)."""
        return 1.0 - next(iter(self.scores.values()))

    def shield_score(self, mode: str = "injection") -> float:
        """The score Meta's Prompt Guard shield thresholds, per mode (llama-stack
        providers/inline/safety/prompt_guard/prompt_guard.py `PromptGuardShield.run`):
        "injection" (its default) flags P(INJECTION) + P(JAILBREAK), i.e. 1 - P(BENIGN);
        "jailbreak" flags P(JAILBREAK) alone. Prompt Guard 2 has one non-benign label, MALICIOUS, which both
        modes read."""
        if mode not in SHIELD_MODES:
            raise GuardError(f"prompt guard mode {mode!r}: give one of {', '.join(SHIELD_MODES)}")
        if mode == "jailbreak" and "JAILBREAK" in self.scores:
            return self.scores["JAILBREAK"]
        return self.malicious


def _config(folder: Path) -> DebertaConfig:
    file = folder / "config.json"
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(folder, "no config.json; a Prompt Guard folder is a Hugging Face model folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(file, f"is not valid JSON ({exc})") from None
    archs = raw.get("architectures") or []
    if raw.get("model_type") != "deberta-v2" or not any(a in ARCHITECTURES for a in archs):
        raise CheckpointError(file, f"model_type {raw.get('model_type')!r} / architectures {archs}: Prompt Guard "
                                    "is a deberta-v2 DebertaV2ForSequenceClassification checkpoint")
    if raw.get("conv_kernel_size", 0):
        raise CheckpointError(file, "conv_kernel_size > 0 (DeBERTa-v2 xlarge's convolution layer) is not supported")
    id2label = raw.get("id2label") or {"0": "LABEL_0", "1": "LABEL_1"}
    try:
        labels = tuple(id2label[str(i)] for i in range(len(id2label)))
    except KeyError:
        raise CheckpointError(file, f"id2label {id2label} does not number its labels 0..n-1") from None
    if labels == ("LABEL_0", "LABEL_1"):
        labels = PROMPT_GUARD_2_LABELS  # transformers' placeholder names on a two-class checkpoint
    known = {f.name for f in fields(DebertaConfig)}
    kw = {k: v for k, v in raw.items() if k in known}
    pos = kw.get("pos_att_type") or ()
    kw["pos_att_type"] = tuple(pos.split("|") if isinstance(pos, str) else pos)
    try:
        return DebertaConfig(**kw, labels=labels)
    except TypeError as exc:
        raise CheckpointError(file, f"unusable configuration ({exc})") from None


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(folder, "no *.safetensors (or pytorch_model.bin) weights next to config.json")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_safetensors(f) if f.suffix == ".safetensors" else load_pth(f))
    # Buffers and unused tables some checkpoints carry (transformers ignores them on load too).
    for name in [n for n in state if n.endswith("embeddings.position_ids")]:
        del state[name]
    return state


class PromptGuard:
    """A loaded Prompt Guard classifier with its tokenizer.json tokenizer."""

    def __init__(self, net: DebertaForSequenceClassification, tokenizer, source: Path | None = None) -> None:
        self.net = net.eval()
        self.tokenizer = tokenizer
        self.source = source
        self.labels = net.config.labels
        ids = {t: tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]")}
        if ids["[CLS]"] is None or ids["[SEP]"] is None:
            raise TokenizerError(f"{source}: tokenizer.json has no [CLS]/[SEP] tokens; not a DeBERTa tokenizer")
        self.cls_id, self.sep_id = ids["[CLS]"], ids["[SEP]"]
        self.pad_id = ids["[PAD]"] if ids["[PAD]"] is not None else net.config.pad_token_id
        self.window = net.config.max_position_embeddings - 2  # text tokens per window, [CLS] and [SEP] around

    @classmethod
    def from_folder(cls, folder: str | Path, *, dtype: torch.dtype = torch.float32) -> PromptGuard:
        from tokenizers import Tokenizer as HFTokenizer

        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(folder, "not a folder; give the Prompt Guard model folder (config.json, "
                                          "model.safetensors, tokenizer.json)")
        config = _config(folder)
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerError(f"{folder}: no tokenizer.json; Prompt Guard needs its Hugging Face tokenizer file")
        try:
            tokenizer = HFTokenizer.from_file(str(tok_file))
        except Exception as exc:  # the tokenizers library raises plain Exception subclasses
            raise TokenizerError(f"{tok_file}: unreadable tokenizer.json ({exc})") from None
        with torch.device("meta"):
            net = DebertaForSequenceClassification(config)
        state = _weights(folder)
        state = {k: v for k, v in state.items()
                 if not (k.endswith("embeddings.position_embeddings.weight") and not config.position_biased_input)}
        try:
            net.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            raise CheckpointError(folder, f"weights do not fit config.json: {exc}") from None
        return cls(net.to(dtype), tokenizer, folder)

    def windows(self, text: str, overlap: int | None = None) -> list[list[int]]:
        """[CLS] + up to `window` tokens + [SEP] per window; consecutive windows share `overlap` tokens."""
        if not isinstance(text, str):
            raise GuardError(f"classify_prompt takes text, got {type(text).__name__}")
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        n = self.window
        overlap = n // 4 if overlap is None else overlap
        if not 0 <= overlap < n:
            raise GuardError(f"overlap={overlap}: give 0 <= overlap < {n} (the window)")
        step = n - overlap
        starts = list(range(0, max(len(ids) - overlap, 1), step))
        return [[self.cls_id, *ids[s:s + n], self.sep_id] for s in starts]

    @torch.inference_mode()
    def probabilities(self, batch: Sequence[Sequence[int]], temperature: float = 1.0) -> torch.Tensor:
        """(len(batch), n_labels) softmax probabilities of right-padded token id rows."""
        width = max(len(r) for r in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.bool)
        for i, row in enumerate(batch):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = True
        device = next(self.net.parameters()).device
        logits = self.net(ids.to(device), mask.to(device))
        return torch.softmax(logits / temperature, -1).cpu()

    def classify(self, texts: str | Sequence[str], *, batch_size: int = 16, overlap: int | None = None,
                 temperature: float = 1.0) -> PromptScores | list[PromptScores]:
        """Label probabilities per text; long texts by their highest-scoring window."""
        single = isinstance(texts, str)
        items = [texts] if single else list(texts)
        per_text = [self.windows(t, overlap) for t in items]
        flat = [w for ws in per_text for w in ws]
        probs = torch.cat([self.probabilities(flat[i:i + batch_size], temperature)
                           for i in range(0, len(flat), batch_size)]) if flat else torch.empty(0)
        out, at = [], 0
        for ws in per_text:
            p = probs[at:at + len(ws)]
            at += len(ws)
            best = int((1.0 - p[:, 0]).argmax())  # the window most likely not benign
            scores = {label: float(v) for label, v in zip(self.labels, p[best])}
            out.append(PromptScores(scores, max(scores, key=scores.get), len(ws), best))
        return out[0] if single else out
