"""Tokenizer.from_file picks the kind from the file's content, and refuses what it cannot read."""

from __future__ import annotations

import gguf
import pytest

from llamaherd.errors import TokenizerError
from llamaherd.tokenizer import Tokenizer, detect_kind


def write_vocab_gguf(path):
    """A GGUF holding only a SentencePiece-style vocabulary (written with gguf-py's own writer)."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581", "\u2581a", "b"]
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-1.0, -2.0, -3.0])
    w.add_token_types([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
                      + [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * 3)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_goes_to_the_gguf_vocab_reader(tmp_path):
    path = tmp_path / "model.bin"  # the name says nothing; the magic does
    write_vocab_gguf(path)
    assert detect_kind(path) == "gguf"
    tok = Tokenizer.from_file(path)
    assert (tok.kind, tok.bos_id, tok.eos_id, tok.vocab_size) == ("gguf", 1, 2, 262)
    assert tok.decode(tok.encode("a b")) == "a b"


@pytest.mark.parametrize(
    "content",
    [b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, b"just some text\nwith lines\n", b"GGUF\x03\x00\x00\x00"],
    ids=["png", "text", "truncated_gguf"],
)
def test_unreadable_files_raise_typed_errors(tmp_path, content):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        Tokenizer.from_file(path)


def test_missing_path(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.from_file(tmp_path / "nope.model")
