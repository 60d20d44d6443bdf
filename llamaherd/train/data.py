"""Training data: JSONL records -> token ids with a loss mask over the assistant's tokens, and the batches made of them.

Record shapes (one JSON object per line), the ones TRL's SFTTrainer and DPOTrainer take:
  {"messages": [...], "tools": [...]}       OpenAI chat; the loss covers every assistant turn (content, tool calls
                                            and its end-of-turn tokens), rendered in the model's own chat format
  {"prompt": str, "completion": str}        plain text: BOS + prompt + completion + EOS, loss on completion + EOS
  {"prompt": [msgs], "completion": [msgs]}  conversational prompt/completion: rendered as one chat
  {"text": str}                             plain text, every token trained
  {"prompt": ..., "chosen": ..., "rejected": ...}   a DPO preference triple (strings or message lists)

The assistant spans are found by rendering the dialog up to each assistant turn with the generation prompt, then
through that turn: the tokens in between are the turn. A format whose renderings are not prefixes of each other
is refused with a DatasetError rather than trained on the wrong tokens.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ChatFormatError, DatasetError

IGNORE = -100  # label of an untrained position (torch cross_entropy's ignore_index; HF's convention too)


@dataclass
class Example:
    """One rendered training example: token ids and which of them the loss covers."""

    ids: list[int]
    trained: list[bool]
    where: str  # "file:line", for messages

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Preference:
    """A DPO pair: the same prompt with the chosen and the rejected answer."""

    chosen: Example
    rejected: Example

    def __len__(self) -> int:
        return max(len(self.chosen), len(self.rejected))


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------


def read_jsonl(path: str | Path) -> list[tuple[str, dict]]:
    """[("file:line", record)] for every non-blank line; a malformed line raises DatasetError with its number."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such data file; give a JSONL file (one JSON object per line)")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise DatasetError(f"{path}:{n}: not valid JSON ({exc}); each line must be one JSON object") from None
            if not isinstance(record, dict):
                raise DatasetError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
            out.append((f"{path}:{n}", record))
    if not out:
        raise DatasetError(f"{path}: no records; the file is empty")
    return out


# ---------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------


class Renderer:
    """Records -> Examples for one tokenizer and chat format, refusing examples longer than `max_len` tokens."""

    def __init__(self, tokenizer, chat_format=None, max_len: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.chat_format = chat_format
        self.max_len = max_len

    # -- plain text ---------------------------------------------------------------------------------------
    def _text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, bos=False, eos=False)

    def _bos(self) -> list[int]:
        bos = getattr(self.tokenizer, "bos_id", None)
        return [bos] if bos is not None else []

    def _eos(self) -> list[int]:
        eos = getattr(self.tokenizer, "eos_id", None)
        return [eos] if eos is not None else []

    def _completion(self, prompt: str, completion: str, where: str) -> Example:
        head = self._bos() + self._text(prompt)
        tail = self._text(completion) + self._eos()
        return Example(head + tail, [False] * len(head) + [True] * len(tail), where)

    # -- chat ---------------------------------------------------------------------------------------------
    def _chat(self, messages, tools, where: str) -> Example:
        if self.chat_format is None:
            raise DatasetError(f"{where}: a chat example, but this model has no chat format; pass chat_format= "
                               "(herd finetune --chat-format NAME) or use prompt/completion records")
        if not isinstance(messages, list) or not messages:
            raise DatasetError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        turns = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"]
        if not turns:
            raise DatasetError(f"{where}: no assistant turn, so nothing to train on; add an assistant message")
        fmt = self.chat_format
        try:
            full = fmt.encode_dialog(messages, tools=tools, add_generation_prompt=False)
            trained = [False] * len(full)
            for i in turns:
                before = fmt.encode_dialog(messages[:i], tools=tools, add_generation_prompt=True) if i else []
                through = fmt.encode_dialog(messages[: i + 1], tools=tools, add_generation_prompt=False)
                if through[: len(before)] != before or full[: len(through)] != through:
                    raise DatasetError(f"{where}: the {fmt.name!r} chat format renders messages[{i}] differently "
                                       "in a longer dialog, so its tokens cannot be located; split the dialog")
                for k in range(len(before), len(through)):
                    trained[k] = True
        except ChatFormatError as exc:
            raise DatasetError(f"{where}: {exc}") from None
        return Example(full, trained, where)

    # -- one record ---------------------------------------------------------------------------------------
    def render(self, record: dict, where: str) -> Example:
        if "messages" in record:
            ex = self._chat(record["messages"], record.get("tools"), where)
        elif "prompt" in record and "completion" in record:
            p, c = record["prompt"], record["completion"]
            if isinstance(p, str) and isinstance(c, str):
                ex = self._completion(p, c, where)
            elif isinstance(p, list) and isinstance(c, list):
                ex = self._chat(p + c, record.get("tools"), where)
            else:
                raise DatasetError(f"{where}: 'prompt' and 'completion' must both be strings or both message lists")
        elif "text" in record:
            if not isinstance(record["text"], str):
                raise DatasetError(f"{where}: 'text' must be a string")
            ids = self._bos() + self._text(record["text"]) + self._eos()
            ex = Example(ids, [False] + [True] * (len(ids) - 1), where)  # the first token has nothing to predict it
        else:
            raise DatasetError(f"{where}: unknown record shape with keys {sorted(record)}; expected 'messages', "
                               "'prompt' + 'completion', 'text', or 'prompt' + 'chosen' + 'rejected'")
        self._check_length(ex)
        if not any(ex.trained[1:]):
            raise DatasetError(f"{where}: no trained tokens after rendering (empty completion?)")
        return ex

    def render_preference(self, record: dict, where: str) -> Preference:
        missing = {"prompt", "chosen", "rejected"} - set(record)
        if missing:
            raise DatasetError(f"{where}: a DPO record needs 'prompt', 'chosen' and 'rejected'; missing {sorted(missing)}")
        p = record["prompt"]
        if isinstance(p, str):
            pair = [self._completion(p, record[k], where) for k in ("chosen", "rejected")]
        elif isinstance(p, list):
            pair = [self._chat(p + record[k], record.get("tools"), where) for k in ("chosen", "rejected")]
        else:
            raise DatasetError(f"{where}: 'prompt' must be a string or a list of messages")
        for ex in pair:
            self._check_length(ex)
        return Preference(*pair)

    def _check_length(self, ex: Example) -> None:
        if self.max_len is not None and len(ex) > self.max_len:
            raise DatasetError(f"{ex.where}: example is {len(ex)} tokens, longer than the context of {self.max_len}; "
                               "shorten or drop it, or raise --max-len (never truncated silently)")


def load_examples(path, renderer: Renderer, preference: bool = False) -> list:
    """Every record of a JSONL file rendered (Preference pairs when `preference`)."""
    render = renderer.render_preference if preference else renderer.render
    return [render(record, where) for where, record in read_jsonl(path)]


def show(ex: Example, tokenizer, open_mark: str = "[[", close_mark: str = "]]") -> str:
    """The example as text with each trained span between `open_mark` and `close_mark` (for --dry-run)."""
    out, k = [], 0
    while k < len(ex.ids):
        j = k
        while j < len(ex.ids) and ex.trained[j] == ex.trained[k]:
            j += 1
        text = tokenizer.decode(ex.ids[k:j])
        out.append(f"{open_mark}{text}{close_mark}" if ex.trained[k] else text)
        k = j
    return "".join(out)


def split(examples: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation): a seeded random `val_fraction` of the examples held out (at least one if > 0)."""
    if not 0 <= val_fraction < 1:
        raise DatasetError(f"validation fraction {val_fraction} must be in [0, 1)")
    if val_fraction == 0:
        return list(examples), []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(examples) * val_fraction))
    if n_val >= len(examples):
        raise DatasetError(f"{len(examples)} examples leave none to train on after a {val_fraction} validation split")
    held = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


# ---------------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------------


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, bucket: int = 16) -> list[list[int]]:
    """Index batches of one epoch, length-bucketed: shuffle, sort within windows of `bucket` batches, shuffle batches.

    A pure function of (lengths, batch_size, seed, epoch): a resumed run rebuilds the same order.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * bucket
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: lengths[i])
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


@dataclass
class Batch:
    """Model inputs and targets. `labels[b, t]` is the token to predict at position t (IGNORE where untrained)."""

    tokens: torch.Tensor  # (B, T) long
    labels: torch.Tensor  # (B, T) long
    positions: torch.Tensor | None = None  # (B, T) rotary positions, reset per packed segment
    segments: torch.Tensor | None = None  # (B, T) segment id per token when packed (0 = padding)

    @property
    def n_trained(self) -> int:
        return int((self.labels != IGNORE).sum())

    def to(self, device: torch.device) -> Batch:
        """The batch on `device` (the model's); itself when already there."""
        if self.tokens.device == torch.device(device):
            return self
        move = (lambda t: None if t is None else t.to(device))
        return Batch(move(self.tokens), move(self.labels), move(self.positions), move(self.segments))


def _labels(ex: Example) -> list[int]:
    """Next-token targets: position t predicts ids[t + 1] when that token is trained."""
    return [ex.ids[t + 1] if ex.trained[t + 1] else IGNORE for t in range(len(ex) - 1)] + [IGNORE]


def collate(examples: list[Example], pad_id: int = 0) -> Batch:
    """Right-padded batch; padding sits after every real token, so causal attention never lets it be seen."""
    T = max(len(e) for e in examples)
    tokens = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for b, e in enumerate(examples):
        tokens[b, : len(e)] = torch.tensor(e.ids)
        labels[b, : len(e)] = torch.tensor(_labels(e))
    return Batch(tokens, labels)


def pack(examples: list[Example], max_len: int, pad_id: int = 0) -> Batch:
    """Examples laid end to end in rows of at most `max_len` tokens (first fit, in the given order).

    Each example keeps its own positions (restarting at 0) and a segment id; `segment_mask` turns the ids into a
    block-diagonal causal mask, so no token attends across examples.
    """
    rows: list[list[Example]] = []
    room: list[int] = []
    for e in examples:
        for r, free in enumerate(room):
            if len(e) <= free:
                rows[r].append(e)
                room[r] -= len(e)
                break
        else:
            rows.append([e])
            room.append(max_len - len(e))
    T = max(max_len - free for free in room)
    B = len(rows)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    segments = torch.zeros((B, T), dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for s, e in enumerate(row, 1):
            n = len(e)
            tokens[b, at : at + n] = torch.tensor(e.ids)
            labels[b, at : at + n] = torch.tensor(_labels(e))
            positions[b, at : at + n] = torch.arange(n)
            segments[b, at : at + n] = s
            at += n
        positions[b, at:] = torch.arange(T - at)
    return Batch(tokens, labels, positions, segments)


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, T, T) bool: query t sees key s when both are in the same packed example (causality is added by the model)."""
    return segments[:, :, None] == segments[:, None, :]
