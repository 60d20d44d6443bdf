"""The GGUF container: ggml type sizes, a bounded header parser, typed metadata, memory-mapped tensor views.

The format (llama.cpp `docs/gguf.md`, `ggml/src/gguf.cpp`): magic "GGUF", u32 version, u64 tensor count,
u64 key/value count, typed key/values, tensor infos (name, dims, ggml type, offset), then the data section at
the next multiple of `general.alignment` (default 32). Every count, length and offset read from the file is
checked against the bytes that remain before anything is allocated for it, so a hostile file costs at most
its own size and raises `GGUFError` instead of crashing or hanging. Tensor data is memory-mapped, never read.
Both the checkpoint reader and the GGUF tokenizer build on this module; it imports neither.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from .errors import GGUFError

# ---- ggml tensor types: ids, block sizes, bytes per block ------------------------------------------

QK_K = 256  # super-block size of the k-quants (ggml-common.h)


@dataclass(frozen=True)
class GGMLType:
    """One ggml tensor type: its id in GGUF files, elements per block and bytes per block."""

    name: str
    id: int
    block_size: int
    type_size: int

    @property
    def quantized(self) -> bool:
        return self.name not in FLOAT_DTYPES

    def row_bytes(self, n_cols: int) -> int:
        """Bytes of one row of `n_cols` elements (n_cols must be a multiple of block_size)."""
        return n_cols // self.block_size * self.type_size


# The types llamaherd reads (quant/ggml_quants.py decodes each quantized one). Ids and sizes: gguf-py
# `constants.py` (GGMLQuantizationType, GGML_QUANT_SIZES) = ggml.h `enum ggml_type`; layouts ggml-common.h.
TYPES: dict[int, GGMLType] = {
    t.id: t
    for t in (
        GGMLType("F32", 0, 1, 4),
        GGMLType("F16", 1, 1, 2),
        GGMLType("Q4_0", 2, 32, 18),
        GGMLType("Q4_1", 3, 32, 20),
        GGMLType("Q5_0", 6, 32, 22),
        GGMLType("Q5_1", 7, 32, 24),
        GGMLType("Q8_0", 8, 32, 34),
        GGMLType("Q2_K", 10, QK_K, 84),
        GGMLType("Q3_K", 11, QK_K, 110),
        GGMLType("Q4_K", 12, QK_K, 144),
        GGMLType("Q5_K", 13, QK_K, 176),
        GGMLType("Q6_K", 14, QK_K, 210),
        GGMLType("IQ4_NL", 20, 32, 18),
        GGMLType("IQ4_XS", 23, QK_K, 136),
        GGMLType("BF16", 30, 1, 2),
    )
}
BY_NAME: dict[str, GGMLType] = {t.name: t for t in TYPES.values()}
FLOAT_DTYPES: dict[str, torch.dtype] = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def ggml_type(t: int | str | GGMLType) -> GGMLType:
    """Look a type up by id, name or value; KeyError names the supported ones."""
    if isinstance(t, GGMLType):
        return t
    table = BY_NAME if isinstance(t, str) else TYPES
    try:
        return table[t.upper() if isinstance(t, str) else int(t)]
    except KeyError:
        raise KeyError(f"ggml type {t!r} is not supported; supported: {', '.join(BY_NAME)}") from None


# ---- the bounded header parser -------------------------------------------------------------------

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 1024  # tensor names and keys; llama.cpp's GGML_MAX_NAME is 64
MAX_STRING_BYTES = 64 << 20  # one metadata string (chat templates are tens of KB)
# Python objects per entry cost far more than the bytes that describe them, so entry counts are capped
# well above real files (Gemma 3: 262,144 tokens; ~500k merges; a few hundred keys; < 10k tensors).
MAX_STRINGS = 1 << 22
MAX_ENTRIES = 1 << 20

# GGUF value types (gguf.md `gguf_metadata_value_type`): id -> (numpy dtype, size), strings/arrays aside.
_SCALARS: dict[int, np.dtype] = {
    0: np.dtype("<u1"), 1: np.dtype("<i1"), 2: np.dtype("<u2"), 3: np.dtype("<i2"), 4: np.dtype("<u4"),
    5: np.dtype("<i4"), 6: np.dtype("<f4"), 7: np.dtype("<u1"), 10: np.dtype("<u8"), 11: np.dtype("<i8"),
    12: np.dtype("<f8"),
}
_BOOL, _STRING, _ARRAY = 7, 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (outermost first): GGUF's ne reversed
    type: GGMLType
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    alignment: int = DEFAULT_ALIGNMENT
    data_offset: int = 0


class _Cursor:
    """Reads little-endian values from a buffer, refusing to step past its end."""

    def __init__(self, buf: memoryview | bytes, path: Path | None) -> None:
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def fail(self, problem: str) -> GGUFError:
        return GGUFError(self.path, f"{problem} (at byte {self.pos}); the file is corrupt or not GGUF, re-download or re-convert it")

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.size - self.pos:
            raise self.fail(f"{what} needs {n} bytes but only {self.size - self.pos} remain")

    def scalar(self, dt: np.dtype, what: str):
        self.need(dt.itemsize, what)
        v = np.frombuffer(self.buf, dtype=dt, count=1, offset=self.pos)[0]
        self.pos += dt.itemsize
        return v.item()

    def u32(self, what: str) -> int:
        return self.scalar(_SCALARS[4], what)

    def u64(self, what: str) -> int:
        return self.scalar(_SCALARS[10], what)

    def string(self, what: str, limit: int = MAX_STRING_BYTES) -> str:
        n = self.u64(f"length of {what}")
        if n > limit:
            raise self.fail(f"{what} is {n} bytes long, more than the {limit} allowed")
        self.need(n, what)
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int, what: str, in_array: bool = False) -> Any:
        if vtype in _SCALARS:
            v = self.scalar(_SCALARS[vtype], what)
            if vtype == 6:  # float32: the shortest decimal that round-trips (1e-05, not 9.999999747e-06)
                return float(str(np.float32(v)))
            return bool(v) if vtype == _BOOL else v
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY and not in_array:
            return self.array(what)
        raise self.fail(f"{what} has unknown value type {vtype}" + (" (nested arrays are unsupported)" if vtype == _ARRAY else ""))

    def array(self, what: str) -> Any:
        etype = self.u32(f"element type of {what}")
        count = self.u64(f"length of {what}")
        if etype in _SCALARS:
            dt = _SCALARS[etype]
            self.need(count * dt.itemsize, f"{count} elements of {what}")
            arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos).copy()
            self.pos += count * dt.itemsize
            return arr.astype(bool) if etype == _BOOL else arr
        if etype == _STRING:
            self.need(count * 8, f"{count} strings of {what}")  # each string has at least its u64 length
            if count > MAX_STRINGS:
                raise self.fail(f"{what} holds {count} strings, more than the {MAX_STRINGS} allowed")
            return [self.string(f"{what}[{i}]") for i in range(count)]
        raise self.fail(f"{what} is an array of unknown or nested type {etype}")


def parse_header(buf: memoryview | bytes, path: Path | None = None) -> GGUFHeader:
    """Parse and validate everything before the data section; raises GGUFError on anything malformed."""
    c = _Cursor(buf, path)
    c.need(4, "magic")
    if bytes(buf[:4]) != MAGIC:
        raise GGUFError(path, f"bad magic {bytes(buf[:4])!r}, expected b'GGUF'; this is not a GGUF file")
    c.pos = 4
    version = c.u32("version")
    if version not in SUPPORTED_VERSIONS:
        hint = " (looks big-endian; convert it little-endian)" if version > 0xFFFF else ""
        raise GGUFError(path, f"GGUF version {version} is unsupported{hint}; supported: {SUPPORTED_VERSIONS}. Re-convert with a current llama.cpp")
    n_tensors = c.u64("tensor count")
    n_kv = c.u64("metadata count")
    # Cheapest possible entries: a kv is key length + empty key + type + u8 (13 bytes); a tensor info is
    # name length + empty name + n_dims + type + offset (24 bytes). Counts beyond that cannot fit.
    if n_kv * 13 > c.size - c.pos or n_tensors * 24 > c.size - c.pos or max(n_kv, n_tensors) > MAX_ENTRIES:
        raise c.fail(f"header claims {n_kv} metadata entries and {n_tensors} tensors, more than the file can hold")

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = c.string(f"metadata key #{i}", MAX_NAME_BYTES)
        if key in metadata:
            raise c.fail(f"metadata key {key!r} appears twice")
        vtype = c.u32(f"type of {key}")
        metadata[key] = c.value(vtype, f"metadata {key!r}")

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(path, f"general.alignment = {alignment!r} is not a positive power of two; fix the metadata")

    infos = []
    for i in range(n_tensors):
        name = c.string(f"tensor name #{i}", MAX_NAME_BYTES)
        n_dims = c.u32(f"dimension count of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise c.fail(f"tensor {name!r} has {n_dims} dimensions; GGUF allows 1 to {MAX_DIMS}")
        ne = [c.u64(f"dimension {d} of {name!r}") for d in range(n_dims)]
        type_id = c.u32(f"type of {name!r}")
        offset = c.u64(f"offset of {name!r}")
        infos.append((name, ne, type_id, offset))

    data_offset = -(-c.pos // alignment) * alignment
    data_size = c.size - data_offset
    tensors: dict[str, TensorInfo] = {}
    for name, ne, type_id, offset in infos:
        if name in tensors:
            raise GGUFError(path, f"tensor {name!r} appears twice; the file is corrupt")
        tensors[name] = _tensor_info(path, name, ne, type_id, offset, alignment, data_offset, data_size)
    end = data_offset
    for t in sorted(tensors.values(), key=lambda t: t.offset):
        if t.offset < end:
            raise GGUFError(path, f"tensor {t.name!r} overlaps the previous tensor's data; the file is corrupt")
        end = t.offset + t.nbytes
    return GGUFHeader(version, metadata, tensors, alignment, data_offset)


def _tensor_info(path, name, ne, type_id, offset, alignment, data_offset, data_size) -> TensorInfo:
    if type_id not in TYPES:
        raise GGUFError(path, f"tensor {name!r} has ggml type {_type_name(type_id)}, which llamaherd cannot read; "
                        f"supported: {', '.join(t.name for t in TYPES.values())}. Re-quantize to one of them")
    t = TYPES[type_id]
    if any(d > 1 << 40 for d in ne) or math.prod(ne) > 1 << 48:
        raise GGUFError(path, f"tensor {name!r} has absurd dimensions {ne}; the file is corrupt")
    if ne[0] % t.block_size:
        raise GGUFError(path, f"tensor {name!r}: row length {ne[0]} is not a multiple of the {t.name} block size {t.block_size}")
    nbytes = t.row_bytes(ne[0]) * math.prod(ne[1:])
    if offset % alignment:
        raise GGUFError(path, f"tensor {name!r} offset {offset} is not a multiple of the alignment {alignment}")
    if offset + nbytes > data_size:
        raise GGUFError(path, f"tensor {name!r} ({t.name}, shape {ne}) needs bytes {offset}..{offset + nbytes} of the data "
                        f"section, which holds only {max(data_size, 0)}; the file is truncated or corrupt")
    return TensorInfo(name, tuple(reversed(ne)), t, data_offset + offset, nbytes)


def _type_name(type_id: int) -> str:
    try:
        return f"{gguf.GGMLQuantizationType(type_id).name} ({type_id})"
    except ValueError:
        return f"#{type_id}"


# ---- opening a file: mmap + tensors as views -----------------------------------------------------


def open_gguf(path: str | Path) -> tuple[GGUFHeader, mmap.mmap]:
    """Parse `path` and return its header with a copy-on-write mapping of the whole file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise GGUFError(path, f"file is {size} bytes, too short for a GGUF header")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except OSError as e:
        raise GGUFError(path, f"cannot open or map the file: {e}") from e
    return parse_header(memoryview(mm), path), mm


def tensor_view(mm: mmap.mmap, info: TensorInfo) -> torch.Tensor:
    """The tensor's bytes in the mapping: float types as their dtype, quantized ones as packed uint8 rows."""
    raw = torch.frombuffer(mm, dtype=torch.uint8, count=info.nbytes, offset=info.offset) if info.nbytes else torch.empty(0, dtype=torch.uint8)
    if not info.type.quantized:
        return raw.view(FLOAT_DTYPES[info.type.name]).reshape(info.shape)
    return raw.reshape(*info.shape[:-1], info.type.row_bytes(info.shape[-1]))  # (..., rows, row_bytes)
