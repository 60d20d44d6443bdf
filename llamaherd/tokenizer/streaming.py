"""Incremental detokenization: turn a stream of token ids into text, one complete character at a time."""

from __future__ import annotations

import codecs

from .base import Tokenizer


def _per_byte_replace(err: UnicodeDecodeError) -> tuple[str, int]:
    # One U+FFFD for every byte of an invalid sequence: how SentencePiece and the `tokenizers` ByteFallback
    # decoder render broken byte tokens (Python's "replace" gives one per maximal invalid subpart instead).
    return "\ufffd" * (err.end - err.start), err.end


codecs.register_error("llamaherd.per_byte_replace", _per_byte_replace)


class StreamDecoder:
    """Feed ids one by one; get back only complete UTF-8 text.

    A character may span several tokens (emoji, CJK and byte-fallback tokens split a character's bytes);
    its bytes are held until the character is whole. Invalid byte sequences become U+FFFD, exactly as
    `tok.decode` renders them, so the concatenation of everything `push` and `flush` return equals
    `tok.decode(all_ids)`.
    """

    def __init__(self, tok: Tokenizer, skip_special: bool = False) -> None:
        self.tok = tok
        self.skip_special = skip_special
        self._special = tok.special_ids if skip_special else frozenset()
        errors = "llamaherd.per_byte_replace" if getattr(tok, "replaces_per_byte", False) else "replace"
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors=errors)
        # SentencePiece drops the space its dummy prefix put before the first word (see spm.py).
        self._strip_first_space = bool(getattr(tok, "strips_leading_space", False))

    def push(self, id: int) -> str:
        """Text completed by this token ('' while a character is still partial)."""
        id = int(id)
        if id in self._special:
            return ""
        return self._emit(self._utf8.decode(self.tok.token_bytes(id)))

    def flush(self) -> str:
        """Whatever is still held at the end of the stream (an incomplete character becomes U+FFFD)."""
        out = self._emit(self._utf8.decode(b"", final=True))
        self._utf8.reset()
        return out

    def _emit(self, text: str) -> str:
        if self._strip_first_space and text:
            self._strip_first_space = False
            if text.startswith(" "):
                text = text[1:]
        return text
