"""Hostile GGUF files: every malformed header raises GGUFError quickly, without large allocations."""

from __future__ import annotations

import struct
import tracemalloc

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llamaherd
from llamaherd import gguf_file
from llamaherd.checkpoint import gguf as reader
from llamaherd.errors import GGUFError
from tests.conftest import TINY, random_model
from tests.gguf_read_fixtures import write_llama_gguf

# ---- a hand-made GGUF builder (layout from llama.cpp docs/gguf.md), for files GGUFWriter refuses to write --

U32, U64, STR, ARR, F32 = 4, 10, 8, 9, 6


def s(text: str | bytes, length: int | None = None) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data) if length is None else length) + data


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def tinfo(name: str, dims: list[int], ttype: int, offset: int) -> bytes:
    return s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", ttype, offset)


def build(kvs=(), tensors=(), data=b"", *, magic=b"GGUF", version=3, n_tensors=None, n_kv=None, align=32) -> bytes:
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(tensors)
    head += b"\0" * (-len(head) % align)
    return head + data


def arch_kv() -> bytes:
    return kv("general.architecture", STR, s("llama"))


def rejects(blob: bytes, match: str | None = None, max_alloc: int = 2 << 20) -> None:
    """parse_header(blob) raises GGUFError, allocating less than `max_alloc` bytes beyond the input."""
    tracemalloc.start()
    try:
        with pytest.raises(GGUFError, match=match):
            gguf_file.parse_header(blob)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < max_alloc, f"parser allocated {peak} bytes on a hostile input"


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    c = TINY["llama3"]
    path = tmp_path_factory.mktemp("fuzz") / "tiny.gguf"
    vocab = {"tokenizer.ggml.model": ("llama", gguf.GGUFValueType.STRING),
             "tokenizer.ggml.tokens": ([f"t{i}" for i in range(c.vocab_size)], gguf.GGUFValueType.ARRAY),
             "tokenizer.ggml.scores": ([float(-i) for i in range(c.vocab_size)], gguf.GGUFValueType.ARRAY)}
    write_llama_gguf(path, c, random_model(c).state_dict(), QT.Q8_0, vocab=vocab)
    return path


# ---- the parser agrees with gguf-py on a valid file ----------------------------------------------


def test_parser_agrees_with_gguf_py(tiny_file):
    ref = gguf.GGUFReader(tiny_file)
    ours = gguf_file.parse_header(tiny_file.read_bytes())
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert mine.type.id == int(t.tensor_type) and mine.nbytes == t.n_bytes
        assert mine.shape == tuple(int(d) for d in reversed(t.shape))
        assert mine.offset == ref.data_offset + (t.data_offset - ref.data_offset)
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        got = ours.metadata[key]
        want = field.contents()
        if isinstance(got, np.ndarray):
            np.testing.assert_array_equal(got, np.asarray(want, dtype=got.dtype))
        elif isinstance(got, float):
            assert np.float32(got) == np.float32(want), key
        else:
            assert got == want, key


# ---- hostile headers -----------------------------------------------------------------------------


def test_truncated_at_many_offsets(tiny_file, tmp_path):
    blob = tiny_file.read_bytes()
    header = gguf_file.parse_header(blob)
    data_end = max(t.offset + t.nbytes for t in header.tensors.values())
    cuts = sorted(set(range(0, header.data_offset, 13)) | set(range(header.data_offset, data_end, 997)) | {data_end - 1})
    for cut in cuts:
        rejects(blob[:cut])
    # Through the public entry point too, from a file on disk.
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(blob[: data_end - 1])
    with pytest.raises(GGUFError, match="truncated"):
        llamaherd.load(bad)


def test_bad_magic_and_versions(tmp_path):
    rejects(build(magic=b"GGUG"), "bad magic")
    rejects(build(version=1), "version 1")
    rejects(build(version=4), "version 4")
    rejects(build(version=3 << 24), "big-endian")
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF")
    with pytest.raises(GGUFError):
        llamaherd.load(bad)


@pytest.mark.parametrize("n_tensors,n_kv", [(1 << 63, 0), (0, 1 << 63), (2**64 - 1, 2**64 - 1), (10**9, 3)])
def test_huge_counts(n_tensors, n_kv):
    rejects(build([arch_kv()], n_tensors=n_tensors, n_kv=n_kv), "more than the file can hold")


def test_huge_string_and_array_lengths():
    rejects(build([s("general.name"[:0], 1 << 62)]), "more than")  # key length
    rejects(build([kv("general.name", STR, s("x", 1 << 40))]), "more than|remain")  # value length
    rejects(build([kv("a.scores", ARR, struct.pack("<IQ", F32, 1 << 61))]), "remain")
    rejects(build([kv("a.tokens", ARR, struct.pack("<IQ", STR, 1 << 58))]), "remain")
    rejects(build([kv("a.nested", ARR, struct.pack("<IQ", ARR, 2))]), "nested")
    rejects(build([kv("a.b", 77, b"")]), "unknown value type")


def test_bad_tensor_infos():
    good = tinfo("token_embd.weight", [32, 4], int(QT.F32), 0)
    data = b"\0" * 512
    gguf_file.parse_header(build([arch_kv()], [good], data))  # the baseline parses
    rejects(build([arch_kv()], [tinfo("t", [32, 4], int(QT.F32), 4096)], data), "truncated")  # past the end
    rejects(build([arch_kv()], [tinfo("t", [32, 1 << 50], int(QT.F32), 0)], data), "absurd|truncated")
    rejects(build([arch_kv()], [tinfo("t", [32, 4], 99, 0)], data), "ggml type #99")
    rejects(build([arch_kv()], [tinfo("t", [32, 4], int(QT.IQ2_XXS), 0)], data), "IQ2_XXS")
    rejects(build([arch_kv()], [tinfo("t", [33, 4], int(QT.Q8_0), 0)], data), "multiple of the Q8_0 block")
    rejects(build([arch_kv()], [tinfo("t", [32, 4], int(QT.F32), 3)], data), "alignment")
    rejects(build([arch_kv()], [tinfo("t", [1] * 5, int(QT.F32), 0)], data), "dimensions")
    overlap = [tinfo("a", [32, 4], int(QT.F32), 0), tinfo("b", [32, 4], int(QT.F32), 256)]
    rejects(build([arch_kv()], overlap, data * 2), "overlaps")
    rejects(build([arch_kv()], [good, good], data), "twice")
    rejects(build([arch_kv(), arch_kv()]), "twice")
    rejects(build([kv("general.alignment", U32, struct.pack("<I", 24))]), "power of two")


def test_metadata_disagreeing_with_tensors_is_rejected(tiny_file, tmp_path):
    blob = bytearray(tiny_file.read_bytes())
    key = b"llama.block_count"
    at = blob.index(key) + len(key) + 4  # skip the u32 value type
    blob[at : at + 4] = struct.pack("<I", 1 << 30)
    bad = tmp_path / "blocks.gguf"
    bad.write_bytes(bytes(blob))
    with pytest.raises(GGUFError, match="block_count"):
        llamaherd.load(bad)


# ---- property-based fuzzing (bounded; a long run lives in tests/fuzz/fuzz_gguf_header.py) ------------


def mutate(blob: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Apply (kind, position, value) edits: 0 overwrite a byte, 1 insert a byte, 2 delete a byte, 3 truncate."""
    out = bytearray(blob)
    for kind, pos, val in edits:
        if not out:
            break
        pos %= len(out)
        if kind == 0:
            out[pos] = val
        elif kind == 1:
            out.insert(pos, val)
        elif kind == 2:
            del out[pos]
        else:
            del out[pos:]
    return bytes(out)


def check_one(blob: bytes) -> None:
    """The parser's whole contract on arbitrary bytes: a header or GGUFError, nothing else."""
    try:
        gguf_file.parse_header(blob)
    except GGUFError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=6))
def test_mutated_headers_raise_only_gguf_error(tiny_header, edits):
    check_one(mutate(tiny_header, edits))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes_after_magic(tail):
    check_one(b"GGUF" + tail)


@pytest.fixture(scope="module")
def tiny_header(tiny_file):
    blob = tiny_file.read_bytes()
    return blob[: gguf_file.parse_header(blob).data_offset + 64]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=4))
def test_mutated_files_read_or_raise_typed_errors(tiny_file, tmp_path_factory, edits):
    """The whole reader (header, config, names, tokenizer): a Checkpoint or a LlamaherdError, nothing else."""
    from llamaherd.errors import LlamaherdError

    blob = tiny_file.read_bytes()
    header_end = gguf_file.parse_header(blob).data_offset
    edits = [(k, p % header_end, v) for k, p, v in edits]  # aim at the header, where the parsing is
    path = tmp_path_factory.mktemp("mut") / "m.gguf"
    path.write_bytes(mutate(blob, edits))
    try:
        reader.read(path)
    except LlamaherdError:
        pass
