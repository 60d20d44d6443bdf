"""The one detokenize-and-stop stream: engine tokens -> pieces of valid UTF-8 text, stop strings cut out even
when they span tokens. Both engines (generate.py, scheduler.py) report `Token`s; every caller reads `Piece`s."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..tokenizer import StreamDecoder

# How many prompt tokens to decode in front of the first generated token: enough context that tokenizers
# which drop a leading space at the start of a decode (SentencePiece) render the continuation's spaces right.
_PROMPT_TAIL = 6
_INCOMPLETE = "\ufffd"  # what decode gives for a byte sequence cut inside a character


@dataclass
class Token:
    """One generated token of one sequence as an engine reports it; `id` None is an end without a new token."""

    id: int | None
    finish_reason: str | None = None  # set on a sequence's last record: "stop", "length", "cancelled", "error"
    stop_token: bool = False  # `id` is an end token: it ends the sequence and is not part of the text
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    error: str | None = None  # what went wrong, with finish_reason "error"


@dataclass
class Piece:
    """What a caller sees per token: the text it released (maybe ""), the token, and the end when it comes."""

    text: str
    token: int | None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # set on the last piece: "stop" (end token or stop string), "length", ...
    stop_token: int | None = None  # the end token that stopped generation (not part of the text)


class TextStream:
    """Feed engine `Token`s with `feed` (a `Piece` back for each), or raw token ids with `push` (text back).

    Tokenizers that give each token's raw bytes go through the tokenizer package's `StreamDecoder` (bytes held
    until a character is whole). Others are decoded incrementally over a short window (as vLLM's
    `detokenize_incrementally`), released only once the window does not end inside a multi-byte character.
    Either way every piece is whole characters and the pieces concatenate to the decode of all the ids.

    Text that could be the start of a stop string is held back until it is known not to be one; once a stop
    string appears, the text before it is released, `stopped` becomes True and everything after is dropped.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = (), prompt_tail: Sequence[int] = (),
                 skip_special: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special  # drop control tokens (<start_of_image>, <|eot_id|>...) from the text
        self.stop = tuple(stop)
        self.bytes_decoder = _byte_decoder(tokenizer, skip_special)
        tail = list(prompt_tail)[-_PROMPT_TAIL:] if tokenizer is not None else []
        if tail and self._decode(tail).endswith(_INCOMPLETE):
            tail = []  # a prompt cut inside a character would shift the offsets below
        self.ids: list[int] = tail
        self.prefix = 0  # window start
        self.read = len(tail)  # ids before this are already turned into text
        self.pending = ""  # decoded text not yet released (it might begin a stop string)
        self.stopped = False

    def feed(self, token: Token) -> Piece:
        """The piece this token releases. A stop string ends the piece with finish_reason "stop" (the caller
        stops the engine: later tokens are dropped); an engine's own end flushes what is held back."""
        if token.id is None or token.stop_token:  # the end, without text of its own
            return Piece(self.flush(), None, finish_reason=token.finish_reason,
                         stop_token=token.id if token.stop_token else None)
        text = self.push(token.id)
        if token.finish_reason and not self.stopped:
            text += self.flush()  # which may still complete a stop string
        reason = "stop" if self.stopped else token.finish_reason
        return Piece(text, token.id, token.logprob, token.top_logprobs, reason)

    def push(self, token: int) -> str:
        """The text this token id completes (maybe ""); after a stop string, always ""."""
        if self.stopped or self.tokenizer is None:
            return ""
        if self.bytes_decoder is not None:
            self.pending += self.bytes_decoder.push(token)
            return self._release(final=False)
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        if len(now) > len(before) and not now.endswith(_INCOMPLETE):
            self.pending += now[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release(final=False)

    def flush(self) -> str:
        """The end of the stream: release everything still held (an unfinished character decodes as U+FFFD)."""
        if self.stopped or self.tokenizer is None:
            return ""
        if self.bytes_decoder is not None:
            self.pending += self.bytes_decoder.flush()
            return self._release(final=True)
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        self.pending += now[len(before) :]
        self.prefix = self.read = len(self.ids)
        return self._release(final=True)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=True) if self.skip_special else self.tokenizer.decode(ids)

    def _release(self, final: bool) -> str:
        text = self.pending
        if self.stop:
            hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                self.pending = ""
                return text[: min(hits)]
            if not final:
                hold = max((_overlap(text, s) for s in self.stop), default=0)
                self.pending = text[len(text) - hold :] if hold else ""
                return text[: len(text) - hold]
        self.pending = ""
        return text


def _byte_decoder(tokenizer, skip_special: bool = False):
    """The tokenizer package's byte-level StreamDecoder, when this tokenizer can give a token's bytes."""
    if tokenizer is None:
        return None
    try:
        tokenizer.token_bytes(0)
    except (NotImplementedError, AttributeError):
        return None
    return StreamDecoder(tokenizer, skip_special=skip_special)


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
