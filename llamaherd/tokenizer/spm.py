"""SentencePiece tokenizers (Llama 1, Llama 2, Code Llama): `tokenizer.model` protobufs via the library."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import sentencepiece

from ..errors import TokenizerError
from .base import Tokenizer, sanitize

SPACE = "\u2581"  # SentencePiece's visible space, "▁"
UNK_SURFACE = " \u2047 "
# Code Llama's infilling pieces (codellama/llama/tokenizer.py: prefix_id, middle_id, suffix_id, eot_id);
# generation of an infill stops at ▁<EOT> (codellama/llama/generation.py text_infilling).
INFILL_PIECES = ("\u2581<PRE>", "\u2581<MID>", "\u2581<SUF>", "\u2581<EOT>")  # what the library's decoder prints for <unk> (TrainerSpec.unk_surface default)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model; ids are exactly the library's `encode(text)` (bos 1 / eos 2 for Llama 2)."""

    kind = "sentencepiece"
    replaces_per_byte = True  # the library's decoder turns each byte of invalid UTF-8 into its own U+FFFD

    def __init__(self, proto: bytes, *, source: Path | None = None) -> None:
        self.source = source
        self._sp = sp = sentencepiece.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError, UnicodeDecodeError) as e:  # a piece that is not UTF-8: found by fuzzing
            raise TokenizerError(f"{source}: not a valid SentencePiece model ({e}); re-download tokenizer.model") from e
        self.vocab_size = sp.vocab_size()
        if self.vocab_size <= 0:
            raise TokenizerError(f"{source}: SentencePiece model has an empty vocabulary; re-download it")
        self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        self.eos_id = sp.eos_id() if sp.eos_id() >= 0 else None
        self.special_tokens = {
            sp.id_to_piece(i): i for i in range(self.vocab_size) if sp.is_control(i) or sp.is_unknown(i)
        }
        for piece in INFILL_PIECES:
            i = sp.piece_to_id(piece)
            if sp.id_to_piece(i) == piece:  # piece_to_id answers unk's id for an unknown piece
                self.special_tokens[piece] = i
        stops = [self.eos_id] if self.eos_id is not None else []
        if "\u2581<EOT>" in self.special_tokens:
            stops.append(self.special_tokens["\u2581<EOT>"])
        self.stop_ids = frozenset(stops)
        self._bytes = [self._piece_bytes(i) for i in range(self.vocab_size)]
        # The decoder drops the space the dummy prefix put before the first word. Ask the library whether
        # this model does that, rather than parsing its normalizer spec.
        probe = next((i for i in range(self.vocab_size) if self._is_word(i)), None)
        self.strips_leading_space = probe is not None and not sp.decode([probe]).startswith(" ")

    @classmethod
    def from_file(cls, path: str | Path) -> SentencePieceTokenizer:
        path = Path(path)
        try:
            proto = path.read_bytes()
        except OSError as e:
            raise TokenizerError(f"{path}: cannot read tokenizer file ({e})") from e
        return cls(proto, source=path)

    def _is_word(self, i: int) -> bool:
        sp = self._sp
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i):
            return False
        piece = sp.id_to_piece(i)
        return piece.startswith(SPACE) and len(piece) > 1

    def _piece_bytes(self, i: int) -> bytes:
        sp = self._sp
        piece = sp.id_to_piece(i)
        if sp.is_control(i):
            return b""  # <s>, </s> are invisible in the library's decode
        if sp.is_unknown(i):
            return UNK_SURFACE.encode("utf-8")
        if sp.is_byte(i):  # byte fallback pieces are spelled <0xAB>
            return bytes([int(piece[3:5], 16)])
        return piece.replace(SPACE, " ").encode("utf-8")

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        # Control pieces are never matched in input text by the library, so literals like "<s>" stay text.
        return self._wrap(self._sp.encode(sanitize(text)), bos, eos)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        return self._sp.decode(ids)

    def token_bytes(self, id: int) -> bytes:
        if not 0 <= id < self.vocab_size:
            self._check_ids([id])
        return self._bytes[id]

    def piece(self, id: int) -> str:
        """The token's piece as stored in the model (e.g. '▁Hello', '<0x0A>')."""
        self._check_ids([id])
        return self._sp.id_to_piece(id)
