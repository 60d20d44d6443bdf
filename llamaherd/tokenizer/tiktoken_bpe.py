"""Llama 3 and Llama 4 tokenizers: tiktoken BPE files (base64 token + rank per line) plus special tokens."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import tiktoken

from ..errors import TokenizerError
from .base import Tokenizer

# ---- the two families' tables -----------------------------------------------------------------
# Source: llama-models 0.3.0, llama_models/llama3/tokenizer.py and llama_models/llama4/tokenizer.py.

# Pre-tokenizer regexes (the Llama 3 one is cl100k-style; Llama 4 uses o200k-style case handling).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
LLAMA4_PATTERN = (
    rf"[^\r\n\p{{L}}\p{{N}}]?[\p{{Lu}}\p{{Lt}}\p{{Lm}}\p{{Lo}}\p{{M}}]*[\p{{Ll}}\p{{Lm}}\p{{Lo}}\p{{M}}]+{_CONTRACTION}?"
    rf"|[^\r\n\p{{L}}\p{{N}}]?[\p{{Lu}}\p{{Lt}}\p{{Lm}}\p{{Lo}}\p{{M}}]+[\p{{Ll}}\p{{Lm}}\p{{Lo}}\p{{M}}]*{_CONTRACTION}?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _numbered(fmt: str, start: int, stop: int) -> list[str]:
    return [fmt.format(i) for i in range(start, stop)]


def llama3_special_tokens() -> list[str]:
    """The 256 Llama 3 special tokens in id order (ids 128000..128255)."""
    named = [
        "<|begin_of_text|>", "<|end_of_text|>",
        "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>", "<|step_id|>",
        "<|start_header_id|>", "<|end_header_id|>",
        "<|eom_id|>", "<|eot_id|>",
        "<|python_tag|>", "<|image|>",
    ]  # fmt: skip
    return named + _numbered("<|reserved_special_token_{}|>", 2, 2 + 256 - len(named))


def llama4_special_tokens() -> list[str]:
    """The 2,048 Llama 4 special tokens in id order (ids 200000..202047)."""
    basic = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    text = (  # 200005..200079
        ["<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>"]
        + _numbered("<|text_post_train_reserved_special_token_{}|>", 0, 6)
        + ["<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>"]
        + _numbered("<|text_post_train_reserved_special_token_{}|>", 8, 69)
    )
    vision = (  # 200080..201133
        ["<|image_start|>", "<|image_end|>", "<|vision_reserved_special_token_0|>",
         "<|vision_reserved_special_token_1|>", "<|tile_x_separator|>", "<|tile_y_separator|>"]
        + _numbered("<|vision_reserved_special_token_{}|>", 2, 6)
        + ["<|image|>", "<|vision_reserved_special_token_6|>", "<|patch|>"]
        + _numbered("<|vision_reserved_special_token_{}|>", 7, 1048)
    )  # fmt: skip
    reasoning = _numbered("<|reasoning_reserved_special_token_{}|>", 0, 8) + [
        "<|reasoning_thinking_start|>",
        "<|reasoning_thinking_end|>",
    ]
    named = basic + text + vision + reasoning
    return named + _numbered("<|reserved_special_token_{}|>", 0, 2048 - len(named))


# Family by number of base (mergeable) tokens: the file's content, not its name, decides.
FAMILIES = {
    128_000: ("llama3", LLAMA3_PATTERN, llama3_special_tokens, ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")),
    200_000: ("llama4", LLAMA4_PATTERN, llama4_special_tokens, ("<|eot|>", "<|eom|>", "<|end_of_text|>")),
}

# ---- Meta's input splitting -------------------------------------------------------------------
# llama_models/llama3/tokenizer.py: text is encoded in 400,000-character pieces, and inside each piece
# any run of more than 25,000 whitespace (or non-whitespace) characters is cut every 25,000 characters
# (tiktoken issue #195). The cuts change the ids, so we reproduce them exactly.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
# A run longer than the limit. The look-behinds make each run scanned once, from its first character,
# so the search stays linear however the runs are laid out. Python's `\s` is exactly str.isspace().
_LONG_RUN = re.compile(rf"(?<!\S)\S{{{MAX_RUN_CHARS + 1},}}|(?<!\s)\s{{{MAX_RUN_CHARS + 1},}}")


# Cheap pre-check: a run of more than 25,000 characters wholly contains at least one aligned block of
# 12,500, so when every block holds both a whitespace and a non-whitespace character there is no long run
# and the chunk goes to tiktoken whole. Typical text answers this in a few characters per block.
_BLOCK = MAX_RUN_CHARS // 2
_SPACE = re.compile(r"\s")
_NON_SPACE = re.compile(r"\S")


def _may_hold_long_run(chunk: str) -> bool:
    for start in range(0, len(chunk) - _BLOCK + 1, _BLOCK):
        end = start + _BLOCK
        if not _SPACE.search(chunk, start, end) or not _NON_SPACE.search(chunk, start, end):
            return True
    return False


def meta_pieces(text: str) -> Iterator[str]:
    """The substrings Meta's tokenizer hands to tiktoken one at a time, in order."""
    for start in range(0, max(len(text), 1), MAX_ENCODE_CHARS):
        chunk = text[start : start + MAX_ENCODE_CHARS]
        if not _may_hold_long_run(chunk):
            yield chunk
            continue
        cut = 0
        for m in _LONG_RUN.finditer(chunk):
            run_start, run_end = m.span()
            for at in range(run_start + MAX_RUN_CHARS, run_end, MAX_RUN_CHARS):
                yield chunk[cut:at]
                cut = at
        yield chunk[cut:]


# ---- reading the file -------------------------------------------------------------------------


def read_bpe_ranks(path: Path) -> dict[bytes, int]:
    """Parse `<base64 token> <rank>` lines; ranks must be exactly 0..n-1."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read tokenizer file ({e})") from e
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected two fields")
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error) as e:
            raise TokenizerError(
                f"{path}: line {lineno} is not '<base64 token> <rank>' ({e}); "
                "the tiktoken file is corrupt, re-download it"
            ) from e
        if token in ranks:
            raise TokenizerError(f"{path}: line {lineno}: token {token!r} appears twice; the file is corrupt")
        ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks are not exactly 0..{len(ranks) - 1}; the tiktoken file is corrupt")
    return ranks


# ---- the tokenizer ----------------------------------------------------------------------------


class TiktokenTokenizer(Tokenizer):
    """A Llama 3 or Llama 4 tokenizer; ids identical to llama-models' own `Tokenizer` classes."""

    kind = "tiktoken"

    def __init__(self, ranks: dict[bytes, int], *, source: Path | None = None, name: str = "tokenizer.model") -> None:
        n_base = len(ranks)
        if n_base not in FAMILIES:
            raise TokenizerError(
                f"{source}: a tiktoken file with {n_base} base tokens is neither Llama 3 (128000) nor "
                "Llama 4 (200000); this version knows only those two special-token tables"
            )
        self.family, pattern, table, stops = FAMILIES[n_base]
        specials = table()
        self.source = source
        self.n_base = n_base
        self.special_tokens = {tok: n_base + i for i, tok in enumerate(specials)}
        self.vocab_size = n_base + len(specials)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.stop_ids = frozenset(self.special_tokens[s] for s in stops)
        self._enc = tiktoken.Encoding(
            name=f"llamaherd-{self.family}-{name}",
            pat_str=pattern,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        by_id: list[bytes] = [b""] * self.vocab_size
        for tok, rank in ranks.items():
            by_id[rank] = tok
        for tok, i in self.special_tokens.items():
            by_id[i] = tok.encode("utf-8")
        self._bytes = by_id

    @classmethod
    def from_file(cls, path: str | Path) -> TiktokenTokenizer:
        path = Path(path)
        return cls(read_bpe_ranks(path), source=path, name=path.name)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        enc = self._enc.encode_ordinary  # special-token literals stay plain text
        if len(text) <= MAX_RUN_CHARS:  # no cut can fall inside: one call, as Meta's would be
            ids = enc(text)
        else:
            ids = []
            for piece in meta_pieces(text):
                ids += enc(piece)
        return self._wrap(ids, bos, eos)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        if skip_special:
            ids = [i for i in ids if i < self.n_base]
        return self._enc.decode(ids, errors="replace")

    def token_bytes(self, id: int) -> bytes:
        if not 0 <= id < self.vocab_size:
            self._check_ids([id])
        return self._bytes[id]
