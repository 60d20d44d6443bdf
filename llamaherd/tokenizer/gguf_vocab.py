"""Tokenizers rebuilt from GGUF metadata (`tokenizer.ggml.*`), matching llama.cpp's `llama-vocab.cpp`.

Two vocabulary kinds: "llama" (SentencePiece-style: pieces with scores, merged greedily by score, byte
fallback through `<0xNN>` tokens; Llama 1/2, Gemma) and "gpt2" (byte-level BPE with merges and a
pre-tokenizer regex chosen by `tokenizer.ggml.pre`; Llama 3). As in llama.cpp with parse_special=false,
user-defined tokens are split out of the text first, while control-token literals stay plain text.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import GGUFError, TokenizerError
from ..gguf_file import open_gguf
from .base import Tokenizer
from .tiktoken_bpe import LLAMA4_PATTERN

# llama.cpp `llama_token_type` / gguf-py `TokenType`.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # SentencePiece's visible space "▁"

# Pre-tokenizer regexes by `tokenizer.ggml.pre` (llama.cpp `llm_tokenizer_bpe` constructor).
LLAMA3_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# End-of-turn texts llama.cpp recognises when `tokenizer.ggml.eot_token_id` is absent (llama-vocab.cpp).
EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>", "_<EOT>",
             "<｜end▁of▁sentence｜>")
# Llama 4: Meta's own split (tiktoken_bpe.LLAMA4_PATTERN), which llama.cpp copies for pre = "llama4" with
# ignore_merges on (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_LLAMA4).
PRE_SPLITS = {"llama-bpe": (LLAMA3_SPLIT, True), "llama3": (LLAMA3_SPLIT, True), "llama4": (LLAMA4_PATTERN, True),
              "default": (GPT2_SPLIT, False), "gpt-2": (GPT2_SPLIT, False)}  # name -> (regex, ignore_merges)


def from_gguf(path: str | Path) -> Tokenizer:
    """The tokenizer stored in a GGUF file's metadata."""
    try:
        header, mm = open_gguf(path)
    except GGUFError as e:
        raise TokenizerError(str(e)) from e
    mm.close()
    tokenizer = from_metadata(header.metadata, Path(path))
    if tokenizer is None:
        raise TokenizerError(f"{path}: tokenizer.ggml.model = {header.metadata['tokenizer.ggml.model']!r}: the file has "
                             "no vocabulary (its model runs on token ids); take the tokenizer from another file")
    return tokenizer


# Files that declare no vocabulary: llama.cpp runs them on token ids (llama-vocab.cpp, LLAMA_VOCAB_TYPE_NONE).
NO_VOCAB = ("none", "no_vocab")


def from_metadata(md: dict[str, Any], source: Path | None = None) -> Tokenizer | None:
    """The vocabulary in GGUF metadata; None when the file declares none (`tokenizer.ggml.model` in NO_VOCAB)."""
    model = md.get("tokenizer.ggml.model")
    if model in NO_VOCAB:
        return None
    if model == "llama":
        return SPMVocab(md, source)
    if model == "gpt2":
        return BPEVocab(md, source)
    raise TokenizerError(f"{source}: tokenizer.ggml.model = {model!r} is unsupported; supported: 'llama', 'gpt2'")


def _numbers(md: dict[str, Any], key: str, source: Path | None, integer: bool = False):
    """A numeric metadata array, or None when absent; anything else is a TokenizerError."""
    v = md.get(key)
    if v is None:
        return None
    import numpy as np

    ok = isinstance(v, np.ndarray) and (np.issubdtype(v.dtype, np.integer) if integer else np.issubdtype(v.dtype, np.number))
    if not ok:
        raise TokenizerError(f"{source}: {key} must be an array of {'integers' if integer else 'numbers'}")
    return v


class _GGUFVocab(Tokenizer):
    """What both kinds share: the token table, types, special ids and user-defined-token splitting."""

    kind = "gguf"

    def __init__(self, md: dict[str, Any], source: Path | None) -> None:
        self.source = source
        tokens = md.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
            raise TokenizerError(f"{source}: tokenizer.ggml.tokens is missing or empty; the GGUF has no vocabulary")
        self.tokens: list[str] = tokens
        self.vocab_size = len(tokens)
        types = _numbers(md, "tokenizer.ggml.token_type", source, integer=True)
        self.types = [int(t) for t in types] if types is not None else [NORMAL] * len(tokens)
        if len(self.types) != len(tokens):
            raise TokenizerError(f"{source}: tokenizer.ggml.token_type has {len(self.types)} entries for {len(tokens)} tokens")
        self.ids = {t: i for i, t in enumerate(tokens)}  # first id wins for duplicated texts
        for i in range(len(tokens) - 1, -1, -1):
            self.ids.setdefault(tokens[i], i)
        self.special_tokens = {t: i for i, t in enumerate(tokens) if self.types[i] == CONTROL}
        self.bos_id = self._id(md, "bos")
        self.eos_id = self._id(md, "eos")
        stops = {self._id(md, k) for k in ("eos", "eot", "eom")} - {None}
        # Files that name no eot/eom id: llama.cpp (llama-vocab.cpp `load`) finds them by their text.
        if self._id(md, "eot") is None:
            stops |= {self.ids[t] for t in EOT_TEXTS if t in self.ids}
        if self._id(md, "eom") is None and "<|eom_id|>" in self.ids:
            stops.add(self.ids["<|eom_id|>"])
        self.stop_ids = frozenset(stops)
        self.add_bos = bool(md.get("tokenizer.ggml.add_bos_token", False))
        self.add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False))
        # llama.cpp matches user-defined tokens longest first (tokenizer_st_partition, sorted by length).
        self.user_defined = sorted((t for i, t in enumerate(tokens) if self.types[i] == USER_DEFINED and t),
                                   key=len, reverse=True)

    def _id(self, md: dict[str, Any], name: str) -> int | None:
        v = md.get(f"tokenizer.ggml.{name}_token_id")
        if v is None:
            return None
        if not isinstance(v, int) or not 0 <= v < self.vocab_size:
            raise TokenizerError(f"{self.source}: tokenizer.ggml.{name}_token_id = {v!r} is not a token id")
        return v

    def _fragments(self, text: str) -> list[str | int]:
        """Split text into raw strings and ids of user-defined tokens found in it."""
        parts: list[str | int] = [text]
        for tok in self.user_defined:
            if tok not in text:
                continue
            out: list[str | int] = []
            for p in parts:
                if isinstance(p, int) or tok not in p:
                    out.append(p)
                    continue
                pieces = p.split(tok)
                for j, piece in enumerate(pieces):
                    if j:
                        out.append(self.ids[tok])
                    if piece:
                        out.append(piece)
            parts = out
        return parts

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids: list[int] = []
        prev_special = True
        for frag in self._fragments(text):
            if isinstance(frag, int):
                ids.append(frag)
                prev_special = True
            else:
                ids.extend(self._encode_raw(frag, prev_special))
                prev_special = False
        return self._wrap(ids, bos, eos)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        ids = list(ids)
        self._check_ids(ids)
        data = b"".join(b"" if skip_special and self.types[i] == CONTROL else self.token_bytes(i) for i in ids)
        return data.decode("utf-8", errors="replace")

    def _encode_raw(self, text: str, prev_special: bool) -> list[int]:
        raise NotImplementedError


class SPMVocab(_GGUFVocab):
    """SentencePiece-style vocabulary: llama.cpp's `llm_tokenizer_spm` (score-ordered bigram merges)."""

    def __init__(self, md: dict[str, Any], source: Path | None) -> None:
        super().__init__(md, source)
        scores = _numbers(md, "tokenizer.ggml.scores", source)
        self.scores = [float(s) for s in scores] if scores is not None else [0.0] * self.vocab_size
        if len(self.scores) != self.vocab_size:
            raise TokenizerError(f"{source}: tokenizer.ggml.scores has {len(self.scores)} entries for {self.vocab_size} tokens")
        self.add_space_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
        self.byte_ids = {}
        for b in range(256):
            tid = self.ids.get(f"<0x{b:02X}>")
            self.byte_ids[b] = tid if tid is not None else self.ids.get(chr(b))
        self.unk_id = self._id(md, "unknown")

    def _encode_raw(self, text: str, prev_special: bool) -> list[int]:
        if self.add_space_prefix and prev_special:
            text = " " + text
        return self._merge(text.replace(" ", SPACE))

    def _merge(self, text: str) -> list[int]:
        # Symbols are the characters; a heap of candidate bigrams ordered by (score desc, left index asc).
        syms = list(text)
        n = len(syms)
        if not n:
            return []
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n)) + [-1]
        heap: list[tuple[float, int, int, str]] = []

        def try_add(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            merged = syms[left] + syms[right]
            tid = self.ids.get(merged)
            if tid is None:
                return
            heapq.heappush(heap, (-self.scores[tid], left, right, merged))

        for i in range(1, n):
            try_add(i - 1, i)
        while heap:
            _, left, right, merged = heapq.heappop(heap)
            if not syms[left] or not syms[right] or syms[left] + syms[right] != merged:
                continue  # one side already merged elsewhere: a stale candidate
            syms[left], syms[right] = merged, ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            try_add(prev[left], left)
            try_add(left, nxt[left])

        # Every merge makes a vocabulary piece, so each final symbol is a token or a single character that
        # is not one; the latter falls back to its UTF-8 bytes (llama.cpp `resegment`).
        out: list[int] = []
        i = 0
        while i != -1:
            tid = self.ids.get(syms[i])
            if tid is not None:
                out.append(tid)
            else:
                for byte in syms[i].encode("utf-8"):
                    bid = self.byte_ids.get(byte)
                    out.append(bid if bid is not None else self.unk_id if self.unk_id is not None else 0)
            i = nxt[i]
        return out

    def token_bytes(self, id: int) -> bytes:
        text, kind = self.tokens[id], self.types[id]
        if kind == BYTE and len(text) == 6 and text.startswith("<0x"):
            return bytes([int(text[3:5], 16)])
        return text.replace(SPACE, " ").encode("utf-8")

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        text = super().decode(ids, skip_special)
        # SentencePiece drops the space it added in front of the first piece.
        return text[1:] if self.add_space_prefix and text.startswith(" ") else text


class BPEVocab(_GGUFVocab):
    """Byte-level BPE vocabulary (`tokenizer.ggml.model` "gpt2"), run by the `tokenizers` library."""

    def __init__(self, md: dict[str, Any], source: Path | None) -> None:
        super().__init__(md, source)
        from tokenizers import Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        pre = md.get("tokenizer.ggml.pre", "default")
        if pre not in PRE_SPLITS:
            raise TokenizerError(f"{source}: tokenizer.ggml.pre = {pre!r} is unsupported; supported: {sorted(PRE_SPLITS)}")
        pattern, ignore_merges = PRE_SPLITS[pre]
        merges = md.get("tokenizer.ggml.merges") or []
        if not isinstance(merges, list) or not all(isinstance(m, str) for m in merges):
            raise TokenizerError(f"{source}: tokenizer.ggml.merges must be an array of strings")
        pairs = []
        for m in merges:
            a, sep, b = m.partition(" ")
            if not sep:
                raise TokenizerError(f"{source}: tokenizer.ggml.merges entry {m!r} is not 'left right'")
            pairs.append((a, b))
        vocab = {t: i for t, i in self.ids.items()}
        self._hf = HFTokenizer(models.BPE(vocab, pairs, ignore_merges=ignore_merges))
        self._hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        self._hf.decoder = decoders.ByteLevel()
        self._byte_decoder = {c: b for b, c in byte_to_unicode().items()}

    def _encode_raw(self, text: str, prev_special: bool) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def token_bytes(self, id: int) -> bytes:
        text = self.tokens[id]
        if self.types[id] in (CONTROL, USER_DEFINED):
            return text.encode("utf-8")
        return bytes(self._byte_decoder.get(c, 0x3F) for c in text)


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (openai/gpt-2 `encoder.py::bytes_to_unicode`).

    Printable Latin-1 bytes stand for themselves; the other 68 bytes map to U+0100 onwards, in byte order.
    Byte-level BPE vocabularies in GGUF ("gpt2" model) spell tokens and merges with these characters.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table
