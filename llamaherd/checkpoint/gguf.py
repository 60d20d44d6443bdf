"""GGUF files: a bounded header parser, metadata -> ModelConfig, tensor names -> Meta names, mmap'd tensors.

The container (llama.cpp `docs/gguf.md`, `ggml/src/gguf.cpp`): magic "GGUF", u32 version, u64 tensor count,
u64 key/value count, typed key/values, tensor infos (name, dims, ggml type, offset), then the data section at
the next multiple of `general.alignment` (default 32). Every count, length and offset read from the file is
checked against the bytes that remain before anything is allocated for it, so a hostile file costs at most
its own size and raises `GGUFError` instead of crashing or hanging. Tensor data is memory-mapped, never read.
Quantized tensors stay packed (uint8 rows); `Checkpoint.prepare` swaps in `llamaherd.quant` modules for them.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import GenerationDefaults, ModelConfig, RopeScaling
from ..errors import GGUFError
from .base import Checkpoint
from ..quant.ggml import GGMLWeight, swap_ggml
from .ggml_quants import FLOAT_DTYPES, TYPES, GGMLType

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


# ---- the bounded header parser -------------------------------------------------------------------


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
        import gguf

        return f"{gguf.GGMLQuantizationType(type_id).name} ({type_id})"
    except (ImportError, ValueError):
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


# ---- metadata -> ModelConfig ---------------------------------------------------------------------

# Meta name tables per architecture ("{i}" is the layer index). gguf-py `tensor_mapping.py` / `constants.py`.
LLAMA_NAMES: dict[str, str] = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.attention_norm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.attention.wq.weight",  # GGUF keeps Meta's adjacent-pair q/k rows:
    "blk.{i}.attn_k.weight": "layers.{i}.attention.wk.weight",  # convert_hf_to_gguf.py un-permutes HF's
    "blk.{i}.attn_v.weight": "layers.{i}.attention.wv.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attention.wo.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.ffn_norm.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.feed_forward.w1.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.feed_forward.w3.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.feed_forward.w2.weight",
}


def _names(arch: str) -> dict[str, str]:
    if arch == "gemma3":
        from ..model.gemma3 import GGUF_NAMES  # engineer F's table, next to the model it describes

        return GGUF_NAMES
    return LLAMA_NAMES


def canonical_name(name: str, table: dict[str, str]) -> str | None:
    """'blk.7.ffn_up.weight' -> 'layers.7.feed_forward.w3.weight' through `table`; None if unknown."""
    if name in table:
        return table[name]
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit():
        key = ".".join(["blk", "{i}", *parts[2:]])
        if key in table:
            return table[key].replace("{i}", parts[1])
    return None


class _Meta:
    """Typed access to `{arch}.*` metadata with errors naming the key."""

    def __init__(self, md: dict[str, Any], arch: str, path: Path) -> None:
        self.md, self.arch, self.path = md, arch, path

    def get(self, key: str, kind: type, default: Any = ...) -> Any:
        full = f"{self.arch}.{key}" if not key.startswith(("general.", "tokenizer.")) else key
        if full not in self.md:
            if default is ...:
                raise GGUFError(self.path, f"metadata {full!r} is missing; the file was not written for llama.cpp's {self.arch!r} architecture")
            return default
        v = self.md[full]
        if isinstance(v, np.ndarray) and v.size and (v == v.flat[0]).all():
            v = v.flat[0].item()  # per-layer arrays (e.g. head_count_kv) that are uniform
        ok = isinstance(v, str) if kind is str else isinstance(v, (int, float)) and not isinstance(v, (bool, str))
        if not ok:
            raise GGUFError(self.path, f"metadata {full!r} = {v!r:.80} should be a {kind.__name__}; fix or re-convert the file")
        return kind(v)


def config_from_metadata(md: dict[str, Any], tensors: dict[str, TensorInfo], path: Path) -> ModelConfig:
    arch = md.get("general.architecture")
    if arch not in ("llama", "gemma3"):
        raise GGUFError(path, f"general.architecture = {arch!r} is not supported by the GGUF reader; supported: 'llama', 'gemma3'")
    m = _Meta(md, arch, path)
    if "token_embd.weight" not in tensors:
        raise GGUFError(path, "tensor 'token_embd.weight' is missing; the file holds no embedding table")
    vocab, dim = tensors["token_embd.weight"].shape
    if m.get("embedding_length", int) != dim:
        raise GGUFError(path, f"{arch}.embedding_length disagrees with token_embd.weight's width {dim}")
    n_heads = m.get("attention.head_count", int)
    head_dim = m.get("attention.key_length", int, None) or dim // max(n_heads, 1)
    rot = m.get("rope.dimension_count", int, head_dim)
    if rot != head_dim:
        raise GGUFError(path, f"{arch}.rope.dimension_count = {rot} but heads are {head_dim} wide; partial rotary is unsupported")
    fields = dict(
        arch=arch, dim=dim, n_layers=m.get("block_count", int), n_heads=n_heads,
        n_kv_heads=m.get("attention.head_count_kv", int, n_heads), vocab_size=vocab,
        hidden_dim=m.get("feed_forward_length", int), head_dim=head_dim,
        norm_eps=m.get("attention.layer_norm_rms_epsilon", float, 1e-5),
        rope_theta=m.get("rope.freq_base", float, 10000.0),
        max_seq_len=m.get("context_length", int, 4096),
        tie_embeddings="output.weight" not in tensors,
        rope_scaling=_rope_scaling(m, path),
    )
    if arch == "gemma3":
        # llama.cpp `llama-model.cpp` (LLM_ARCH_GEMMA3) hard-codes what the GGUF does not say: every 6th layer
        # is global, local layers use rope base 10000, queries scale by 1/sqrt(head_dim) except on 27B
        # (62 layers), which uses 1/sqrt(dim / n_heads).
        fields.update(
            sliding_window=m.get("attention.sliding_window", int, None),
            sliding_window_pattern=_int_or(md.get("gemma3.attention.sliding_window_pattern"), 6),
            rope_local_theta=10000.0,
            query_pre_attn_scalar=float(dim // n_heads if fields["n_layers"] == 62 else head_dim),
            final_logit_softcap=m.get("final_logit_softcapping", float, None),
            attn_logit_softcap=m.get("attn_logit_softcapping", float, None),
        )
    for key in ("n_layers", "n_heads", "n_kv_heads", "hidden_dim", "head_dim", "max_seq_len"):
        if not 0 < fields[key] < 1 << 31:
            raise GGUFError(path, f"metadata gives {key} = {fields[key]}, which is not a usable size; fix the {arch}.* keys")
    blocks = {int(n.split(".")[1]) for n in tensors if n.startswith("blk.") and n.split(".")[1].isdigit()}
    if len(blocks) != fields["n_layers"] or (blocks and max(blocks) != len(blocks) - 1):
        raise GGUFError(path, f"{arch}.block_count = {fields['n_layers']} but the file holds tensors for "
                        f"{len(blocks)} blocks (indices {min(blocks, default=None)}..{max(blocks, default=None)})")
    try:
        return ModelConfig(**fields)
    except (ValueError, ZeroDivisionError) as e:
        raise GGUFError(path, f"metadata describes an impossible model: {e}") from e


def _int_or(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


def _rope_scaling(m: _Meta, path: Path) -> RopeScaling | None:
    kind = m.get("rope.scaling.type", str, "none")
    if kind == "none":
        return None
    if kind == "linear":
        return RopeScaling(kind="linear", factor=m.get("rope.scaling.factor", float))
    raise GGUFError(path, f"{m.arch}.rope.scaling.type = {kind!r} is unsupported; supported: 'none', 'linear' (+ rope_freqs tensor)")


def rope_scaling_from_factors(factors: torch.Tensor, head_dim: int, theta: float, path: Path) -> RopeScaling:
    """Recover Llama 3.1-style scaling from llama.cpp's `rope_freqs.weight` (per-frequency divisors).

    convert_hf_to_gguf.py (LlamaModel.generate_extra_tensors) writes 1 / scale per frequency instead of the
    rope_scaling parameters, so we search the parameter sets released models use and insist on a match.
    """
    from ..model.rope import inv_frequencies

    factors = factors.float().flatten()
    base = inv_frequencies(head_dim, theta)
    if factors.shape != base.shape:
        raise GGUFError(path, f"rope_freqs.weight has {factors.numel()} entries, expected head_dim/2 = {base.numel()}")
    factor = float(factors.max())
    for original in (8192, 4096, 16384, 32768, 2048, 131072):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0)):
            s = RopeScaling(kind="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high, original_max_position=original)
            if torch.allclose(base / inv_frequencies(head_dim, theta, s), factors, rtol=1e-4, atol=1e-5):
                return s
    raise GGUFError(path, "rope_freqs.weight matches no Llama 3.1-style scaling (factor/low/high/original); unsupported rope scaling")


# ---- the reader ----------------------------------------------------------------------------------


def read(path: str | Path) -> Checkpoint:
    """Read a GGUF file into a Checkpoint: canonical names, mmap'd tensors, quantized weights kept packed."""
    path = Path(path)
    header, mm = open_gguf(path)
    config = config_from_metadata(header.metadata, header.tensors, path)
    table = _names(config.arch)
    state: dict[str, torch.Tensor] = {}
    qtypes: dict[str, GGMLType] = {}
    unknown = []
    for info in header.tensors.values():
        if info.name == "rope_freqs.weight" and config.arch == "llama":
            from .ggml_quants import dequantize

            t = tensor_view(mm, info)
            t = dequantize(t, info.type) if info.type.quantized else t
            config = config.replace(rope_scaling=rope_scaling_from_factors(t, config.head_dim, config.rope_theta, path))
            continue
        name = canonical_name(info.name, table)
        if name is None:
            unknown.append(info.name)
            continue
        t = tensor_view(mm, info)
        if info.type.quantized:
            if t.dim() != 2:
                raise GGUFError(path, f"quantized tensor {info.name!r} has shape {info.shape}; only 2-D quantized weights are supported")
            qtypes[name] = info.type
            t = GGMLWeight(t, info.type)
        elif config.arch == "gemma3":
            from ..model.gemma3 import from_gguf

            t = from_gguf(name, t)
        state[name] = t
    if unknown:
        raise GGUFError(path, f"tensors {unknown[:6]} have no {config.arch} counterpart in llamaherd; the file is for another architecture")
    def prepare(net: torch.nn.Module) -> None:
        swap_ggml(net, qtypes)

    md = header.metadata
    tokenizer = None
    if "tokenizer.ggml.model" in md:
        from ..errors import TokenizerError
        from ..tokenizer.gguf_vocab import from_metadata

        try:
            tokenizer = from_metadata(md, path)
        except TokenizerError as e:
            raise GGUFError(path, f"tokenizer metadata is unusable: {e}") from e
    return Checkpoint(
        config=config,
        state_dict=state,
        source=path,
        tokenizer=tokenizer,
        generation=_generation(md),
        chat_template=md.get("tokenizer.chat_template") if isinstance(md.get("tokenizer.chat_template"), str) else None,
        prepare=prepare if qtypes else None,
        metadata={
            "format": "gguf",
            "gguf_version": header.version,
            "quantized": {k: v.name for k, v in qtypes.items()},
            "file_type": _file_type(md.get("general.file_type")),
            "name": md.get("general.name") if isinstance(md.get("general.name"), str) else None,
            "gguf": {k: v for k, v in md.items() if not isinstance(v, (list, np.ndarray)) or len(v) <= 64},
            "_mmap": mm,  # keeps the mapping alive as long as the checkpoint
        },
    )


def _file_type(value: Any) -> str | None:
    """general.file_type (llama.cpp `llama_ftype`, e.g. 15) as its name ("Q4_K_M"), None when absent or unknown."""
    try:
        import gguf

        return gguf.LlamaFileType(int(value)).name.removeprefix("MOSTLY_")
    except (ImportError, TypeError, ValueError):
        return None


def _generation(md: dict[str, Any]) -> GenerationDefaults:
    ids = [md[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
           if isinstance(md.get(k), int)]
    bos = md.get("tokenizer.ggml.bos_token_id")
    return GenerationDefaults(eos_token_ids=tuple(dict.fromkeys(ids)), bos_token_id=bos if isinstance(bos, int) else None)
