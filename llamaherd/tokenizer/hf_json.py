"""Hugging Face `tokenizer.json` tokenizers via the `tokenizers` library, with bos/eos from tokenizer_config.json."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tokenizers

from ..errors import TokenizerError
from .base import Tokenizer, sanitize

SPACE = "\u2581"  # "▁", SentencePiece's visible space, used by Metaspace / Llama 2 style tokenizer.json files

# End-of-turn / end-of-message tokens of the Llama family (llama_models llama3/tokenizer.py `stop_tokens`,
# llama4/tokenizer.py `stop_tokens`) and Gemma 3 (<end_of_turn>, generation_config.json of google/gemma-3-*):
# every one present among the special tokens joins eos in stop_ids.
END_OF_TURN = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|eot|>", "<|eom|>", "<end_of_turn>")


def byte_level_alphabet() -> dict[str, int]:
    """Char -> byte of the GPT-2 byte-level encoding (openai/gpt-2 src/encoder.py `bytes_to_unicode`).

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are shifted to U+0100 onwards, in order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    shifted = (b for b in range(256) if b not in table.values())
    for n, b in enumerate(shifted):
        table[chr(256 + n)] = b
    return table


def _decoder_types(spec: Any) -> set[str]:
    """Every decoder type named in tokenizer.json's `decoder` (Sequence flattened)."""
    if not isinstance(spec, dict):
        return set()
    found = {spec.get("type", "")}
    for child in spec.get("decoders") or []:
        found |= _decoder_types(child)
    return found


def _token_name(value: Any) -> str | None:
    # tokenizer_config.json spells a token either "<s>" or {"content": "<s>", ...}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer(Tokenizer):
    """A tokenizer.json; ids are the `tokenizers` library's, with special-token literals kept as plain text."""

    kind = "hf"

    def __init__(self, path: Path) -> None:
        self.source = path
        try:
            self._tk = tk = tokenizers.Tokenizer.from_file(str(path))
        except BaseException as e:  # plain Exception on a malformed file; a Rust panic (pyo3's PanicException,
            # a BaseException) on some out-of-range fields, found by fuzzing
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise TokenizerError(
                f"{path}: not a tokenizer.json the tokenizers library can read ({e}); re-download it"
            ) from None
        # Text that happens to spell a special token (e.g. "<|eot_id|>") is tokenized as text.
        tk.encode_special_tokens = True
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)
        self._added = tk.get_added_tokens_decoder()
        self.special_tokens = {t.content: i for i, t in sorted(self._added.items()) if t.special}
        self._configure_specials(path.parent)

        decoder = json.loads(tk.decoder.__getstate__()) if tk.decoder is not None else None
        kinds = _decoder_types(decoder)
        if "ByteLevel" in kinds:
            self._mode = "bytelevel"  # tokens spell bytes in the GPT-2 alphabet
        elif kinds & {"ByteFallback", "Metaspace", "Replace"}:
            self._mode = "spm"  # "▁" for space, <0xNN> byte tokens
        else:
            self._mode = "text"
        self._bytes: list[bytes] | None = None  # built on first use: streaming needs it, plain encode does not
        # Behaviours of the decoder that streaming must reproduce, asked of the library itself.
        word = tk.token_to_id(SPACE + "a") or tk.token_to_id(SPACE + "t")
        self.strips_leading_space = self._mode == "spm" and word is not None and not tk.decode([word]).startswith(" ")
        e2, x82 = tk.token_to_id("<0xE2>"), tk.token_to_id("<0x82>")
        self.replaces_per_byte = e2 is not None and x82 is not None and tk.decode([e2, x82]) == "\ufffd\ufffd"

    def _configure_specials(self, folder: Path) -> None:
        config = self._read_json(folder / "tokenizer_config.json")
        ids = self._tk.token_to_id
        bos, eos = _token_name(config.get("bos_token")), _token_name(config.get("eos_token"))
        if bos is None and eos is None:  # no tokenizer_config.json: the post-processor's template names them
            bos, eos = self._template_specials()
        self.bos_id = ids(bos) if bos else None
        self.eos_id = ids(eos) if eos else None
        stops = {self.eos_id} if self.eos_id is not None else set()
        generation = self._read_json(folder / "generation_config.json").get("eos_token_id")
        for i in generation if isinstance(generation, list) else [generation]:
            if isinstance(i, int) and 0 <= i < self.vocab_size:
                stops.add(i)
        stops |= {self.special_tokens[t] for t in END_OF_TURN if t in self.special_tokens}
        self.stop_ids = frozenset(stops)

    def _template_specials(self) -> tuple[str | None, str | None]:
        """(bos, eos) literals around `$A` in a TemplateProcessing post-processor (possibly in a Sequence)."""
        post = self._tk.post_processor
        spec = json.loads(post.__getstate__()) if post is not None else {}
        for proc in [spec, *spec.get("processors", [])]:
            if proc.get("type") == "TemplateProcessing":
                single = proc.get("single", [])
                at = next((k for k, part in enumerate(single) if "Sequence" in part), len(single))
                before = [p["SpecialToken"]["id"] for p in single[:at] if "SpecialToken" in p]
                after = [p["SpecialToken"]["id"] for p in single[at + 1 :] if "SpecialToken" in p]
                return (before[0] if before else None), (after[-1] if after else None)
        return None, None

    def _read_json(self, path: Path) -> dict:
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise TokenizerError(f"{path}: not valid JSON ({e}); fix or remove the file") from e
        if not isinstance(data, dict):
            raise TokenizerError(f"{path}: expected a JSON object at the top level")
        return data

    def _byte_table(self) -> list[bytes]:
        table = [b""] * self.vocab_size
        for token, i in self._tk.get_vocab(with_added_tokens=False).items():
            table[i] = self._piece_bytes(i, token)
        for i, t in self._added.items():
            table[i] = t.content.encode("utf-8")
        return table

    def _piece_bytes(self, i: int, token: str) -> bytes:
        if self._mode == "bytelevel":
            try:
                return bytes([_ALPHABET[c] for c in token])
            except KeyError:
                pass
        elif self._mode == "spm":
            if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                return bytes([int(token[3:5], 16)])
            return token.replace(SPACE, " ").encode("utf-8")
        return self._tk.decode([i]).encode("utf-8")

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        return cls(Path(path))

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        # add_special_tokens=False: bos/eos are ours to add, never the post-processor's.
        try:
            ids = self._tk.encode(sanitize(text), add_special_tokens=False).ids
        except Exception as e:  # a file the library loads but cannot apply (unk_token not in its vocabulary: fuzzing)
            raise TokenizerError(f"{self.source}: this tokenizer.json cannot encode text ({e}); re-download it") \
                from None
        return self._wrap(ids, bos, eos)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        return self._tk.decode(ids, skip_special_tokens=skip_special)

    def token_bytes(self, id: int) -> bytes:
        if not 0 <= id < self.vocab_size:
            self._check_ids([id])
        if self._bytes is None:
            self._bytes = self._byte_table()
        return self._bytes[id]


_ALPHABET = byte_level_alphabet()
