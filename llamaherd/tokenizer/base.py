"""The Tokenizer interface every tokenizer kind implements, and detection of a tokenizer file by content."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import ClassVar

from ..errors import TokenizerError


def sanitize(text: str) -> str:
    """Replace lone surrogates (not encodable as UTF-8) with U+FFFD; valid surrogate pairs are joined.

    The same repair tiktoken applies before encoding, so every tokenizer kind accepts the same inputs.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class Tokenizer:
    """Text <-> token ids for one model.

    Subclasses set `kind`, `special_tokens`, `bos_id`, `eos_id`, `stop_ids`, `vocab_size` and implement
    `encode`, `decode`, `token_bytes`. Special-token literals that appear in text given to `encode` are
    encoded as plain text, never as control tokens: only code that builds prompts (chat formats) inserts
    control tokens, by id.
    """

    kind: str = ""
    special_tokens: dict[str, int]
    bos_id: int | None = None
    eos_id: int | None = None
    stop_ids: frozenset[int] = frozenset()
    vocab_size: int = 0
    source: Path | None = None
    # detect_kind's answer -> the reader of a file of that kind. Filled by tokenizer/__init__.py, which imports
    # every kind's module; this module imports none of them.
    readers: ClassVar[dict[str, Callable[[Path], Tokenizer]]] = {}

    # ---- the interface -------------------------------------------------------------------------

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        raise NotImplementedError

    def token_bytes(self, id: int) -> bytes:
        """The raw bytes one token stands for (may be part of a UTF-8 character); for streaming."""
        raise NotImplementedError

    def special_id(self, name: str) -> int:
        """Id of a special token, by its literal (`<|eot_id|>`) or by its bare name (`eot_id`)."""
        for key in (name, f"<|{name}|>", f"<{name}>"):
            if key in self.special_tokens:
                return self.special_tokens[key]
        shown = ", ".join(sorted(self.special_tokens, key=self.special_tokens.__getitem__)[:12])
        raise TokenizerError(
            f"{self.source or self.kind + ' tokenizer'}: no special token {name!r}; "
            f"known ones include {shown} (see .special_tokens for all)"
        )

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self.special_tokens.values())

    # ---- helpers for subclasses ----------------------------------------------------------------

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos:
            if self.bos_id is None:
                raise TokenizerError(f"{self.source}: this tokenizer has no BOS token; call encode with bos=False")
            ids.insert(0, self.bos_id)
        if eos:
            if self.eos_id is None:
                raise TokenizerError(f"{self.source}: this tokenizer has no EOS token; call encode with eos=False")
            ids.append(self.eos_id)
        return ids

    def _check_ids(self, ids: Sequence[int]) -> None:
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise TokenizerError(
                f"{self.source or self.kind}: token id {bad} is outside the vocabulary [0, {self.vocab_size}); "
                "the ids come from a different model or were corrupted"
            )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} kind={self.kind} vocab_size={self.vocab_size} source={self.source}>"

    # ---- constructors --------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer, detecting its kind from the file's content (never its name).

        Accepts a tiktoken BPE `tokenizer.model` (Llama 3 / Llama 4), a SentencePiece `.model`
        (Llama 1 / 2, Code Llama), a Hugging Face `tokenizer.json`, or a folder holding one of them
        (tokenizer.json preferred, then tokenizer.model).
        """
        path = Path(path)
        if path.is_dir():
            for name in ("tokenizer.json", "tokenizer.model"):
                if (path / name).is_file():
                    return cls.from_file(path / name)
            raise TokenizerError(
                f"{path}: folder holds neither tokenizer.json nor tokenizer.model; "
                "point at the tokenizer file itself or copy it into the folder"
            )
        if not path.is_file():
            raise TokenizerError(f"{path}: tokenizer file not found; check the path")
        return cls.readers[detect_kind(path)](path)

    @classmethod
    def llama3(cls) -> Tokenizer:
        """The official Llama 3 tokenizer (128,000 BPE tokens + 256 special), shipped in llama_models."""
        return _official("llama3")

    @classmethod
    def llama4(cls) -> Tokenizer:
        """The official Llama 4 tokenizer (200,000 BPE tokens + 2,048 special), shipped in llama_models."""
        return _official("llama4")


@lru_cache(maxsize=None)
def _official(family: str) -> Tokenizer:
    try:
        ref = resources.files(f"llama_models.{family}").joinpath("tokenizer.model")
    except ModuleNotFoundError as e:
        raise TokenizerError(
            f"the official {family} tokenizer ships in the llama-models package: pip install llama-models"
        ) from e
    with resources.as_file(ref) as p:
        return Tokenizer.from_file(p)


def detect_kind(path: Path) -> str:
    """'tiktoken', 'sentencepiece', 'hf' or 'gguf', from the first bytes of the file."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        raise TokenizerError(f"{path}: tokenizer file is empty; re-download it")
    if head[:4] == b"GGUF":
        return "gguf"
    if head.lstrip()[:1] == b"{":
        return "hf"
    if _looks_like_tiktoken(head):
        return "tiktoken"
    # A SentencePiece ModelProto begins with field 1 (repeated SentencePiece), wire type 2: tag byte 0x0A.
    if head[:1] == b"\x0a":
        return "sentencepiece"
    raise TokenizerError(
        f"{path}: not a tokenizer file this version can read (expected a tiktoken BPE file, a SentencePiece "
        "model, a Hugging Face tokenizer.json or a GGUF file)"
    )


def _looks_like_tiktoken(head: bytes) -> bool:
    # Lines of "<base64 token> <rank>"; the last line of the head may be cut short, so check the others.
    lines = head.split(b"\n")[:-1] or head.split(b"\n")
    if not lines:
        return False
    b64 = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
    for line in lines[:50]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or not set(parts[0]) <= b64:
            return False
    return True
