"""Importance matrices as llama.cpp's llama-imatrix collects and stores them: activation statistics, files.

For each matrix product of the model (`blk.*` weights; for an expert stack, each expert apart) the sum over
tokens of the squared input of every column, and how many tokens went in (llama.cpp tools/imatrix/imatrix.cpp,
`IMatrixCollector::collect_imatrix`). `llama-quantize --imatrix` weights each column's rounding error by the
mean, sum / count (tools/quantize/quantize.cpp `load_imatrix`); quant/quantize.py takes that mean.

Two files, both read and written, laid out as imatrix.cpp's `save_imatrix_legacy` / `save_imatrix` write them:

- legacy `.dat` (little-endian): int32 n_entries; per entry int32 name length, the name, int32 ncall,
  int32 nval, nval float32 values = (sum / count) * ncall, ncall = ceil(max count / chunk size); then int32
  the number of chunks, int32 dataset name length, the dataset name.
- GGUF (`general.type` "imatrix", `imatrix.datasets`, `imatrix.chunk_count`, `imatrix.chunk_size`): per entry
  F32 tensors `NAME.in_sum2` (n_mat, n) and `NAME.counts` (n_mat, 1).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import replacing
from ..errors import LlamaherdError
from ..gguf_file import MAGIC as GGUF_MAGIC

_MAX_NAME = 1 << 12  # a GGUF tensor name is at most 64 bytes; anything near this bound is a corrupt file


class IMatrixError(LlamaherdError):
    """An importance-matrix file that cannot be read, or one that does not fit the model being quantized."""


@dataclass
class Entry:
    """Statistics of one weight: per matrix (expert) the column sums of squared inputs, and the tokens counted."""

    sums: torch.Tensor  # (n_mat, n) float64
    counts: torch.Tensor  # (n_mat,) float64

    def mean(self) -> torch.Tensor:
        """(n_mat, n) mean squared input per column; a matrix that saw no token gets ones (as llama.cpp stores it)."""
        seen = self.counts > 0
        c = torch.where(seen, self.counts, torch.ones_like(self.counts))[:, None]
        return torch.where(seen[:, None], self.sums / c, torch.ones_like(self.sums)).float()


@dataclass
class IMatrix:
    """The statistics of every collected weight, by GGUF tensor name, with the chunking they came from."""

    entries: dict[str, Entry] = field(default_factory=dict)
    chunk_size: int = 512
    chunks: int = 0
    datasets: list[str] = field(default_factory=list)

    def weights(self, name: str, n_mat: int, n: int) -> torch.Tensor | None:
        """The importance weights quantize() takes for GGUF tensor `name` of n_mat matrices with n columns."""
        e = self.entries.get(name)
        if e is None:
            return None
        if e.sums.shape == (1, n_mat * n) and n_mat > 1:  # a legacy .dat entry: the experts' rows back to back
            e = Entry(e.sums.view(n_mat, n), e.counts.expand(n_mat))
        if e.sums.shape[1] != n or e.sums.shape[0] not in (1, n_mat):
            raise IMatrixError(f"the importance matrix entry {name} holds {tuple(e.sums.shape)} values; the tensor "
                               f"has {n_mat} matrices of {n} columns: it was collected on another model")
        return e.mean()

    def add(self, name: str, x: torch.Tensor, mat: int = 0, n_mat: int = 1) -> None:
        """Count the rows of x (tokens, n) as inputs of matrix `mat` of weight `name`."""
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        e = self.entries.get(name)
        if e is None:
            e = self.entries[name] = Entry(torch.zeros(n_mat, x.shape[1], dtype=torch.float64),
                                           torch.zeros(n_mat, dtype=torch.float64))
        e.sums[mat] += (x * x).sum(0)
        e.counts[mat] += x.shape[0]


# -- the legacy .dat file -----------------------------------------------------------------------------------------


def write_dat(im: IMatrix, path: str | Path) -> Path:
    """llama.cpp's legacy imatrix.dat (`--output-format dat`)."""
    path = Path(path)
    names = sorted(n for n, e in im.entries.items() if bool((e.counts > 0).any()))
    out = [struct.pack("<i", len(names))]
    for name in names:
        e = im.entries[name]
        ncall = math.ceil(float(e.counts.max()) / im.chunk_size)
        seen = e.counts > 0  # a matrix no token reached is stored as 1 (imatrix.cpp: "store 1 for partial data")
        c = torch.where(seen, e.counts, torch.ones_like(e.counts))[:, None]
        values = torch.where(seen[:, None], e.sums / c * ncall, torch.full_like(e.sums, float(ncall)))
        raw = name.encode()
        out += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, values.numel()),
                values.to(torch.float32).numpy().astype("<f4").tobytes()]
    dataset = (im.datasets[-1] if im.datasets else "").encode()
    out += [struct.pack("<i", im.chunks), struct.pack("<i", len(dataset)), dataset]
    with replacing(path) as tmp:
        tmp.write_bytes(b"".join(out))
    return path


def _read_dat(data: bytes, path: Path, chunk_size: int) -> IMatrix:
    """As imatrix.cpp's load_imatrix_legacy: sums = value * chunk_size, counts = ncall * chunk_size (one count per
    entry: the format keeps no per-expert counts)."""
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise IMatrixError(f"{path}: truncated at byte {pos}; it is not a complete imatrix file")
        pos += n
        return data[pos - n:pos]

    (n_entries,) = struct.unpack("<i", take(4))
    if n_entries < 1:
        raise IMatrixError(f"{path}: holds no entries (n_entries = {n_entries}); it is not an imatrix file")
    im = IMatrix(chunk_size=chunk_size)
    for _ in range(n_entries):
        (n,) = struct.unpack("<i", take(4))
        if not 0 < n < _MAX_NAME:
            raise IMatrixError(f"{path}: an entry name of {n} bytes; the file is corrupt")
        name = take(n).decode("utf-8", errors="replace")
        ncall, nval = struct.unpack("<ii", take(8))
        if nval < 1 or ncall < 0:
            raise IMatrixError(f"{path}: entry {name} has {nval} values and {ncall} calls; the file is corrupt")
        values = torch.from_numpy(np.frombuffer(take(4 * nval), dtype="<f4").astype(np.float64))
        im.entries[name] = Entry(values[None] * chunk_size, torch.tensor([float(ncall * chunk_size)]))
    if pos + 4 <= len(data):
        (im.chunks,) = struct.unpack("<i", take(4))
    if pos + 4 <= len(data):
        (n,) = struct.unpack("<i", take(4))
        if 0 <= n <= len(data) - pos:
            im.datasets = [take(n).decode("utf-8", errors="replace")]
    return im


# -- the GGUF imatrix file ----------------------------------------------------------------------------------------


def write_gguf(im: IMatrix, path: str | Path) -> Path:
    """llama.cpp's GGUF imatrix (the default of current llama-imatrix)."""
    import gguf

    path = Path(path)
    with replacing(path) as tmp:
        w = gguf.GGUFWriter(tmp, arch="imatrix")  # gguf-py writes general.architecture; llama.cpp ignores it
        w.add_type("imatrix")
        w.add_array("imatrix.datasets", list(im.datasets))
        w.add_uint32("imatrix.chunk_count", im.chunks)
        w.add_uint32("imatrix.chunk_size", im.chunk_size)
        for name in sorted(im.entries):
            e = im.entries[name]
            w.add_tensor(f"{name}.in_sum2", e.sums.to(torch.float32).numpy())
            w.add_tensor(f"{name}.counts", e.counts.to(torch.float32).numpy()[:, None])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def _read_gguf(path: Path) -> IMatrix:
    import gguf

    try:
        r = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise IMatrixError(f"{path}: not a readable GGUF imatrix ({exc})") from None
    fields = r.fields

    def scalar(key: str, default: int) -> int:
        f = fields.get(key)
        return int(f.parts[f.data[0]][0]) if f is not None else default

    im = IMatrix(chunk_size=scalar("imatrix.chunk_size", 512), chunks=scalar("imatrix.chunk_count", 0))
    ds = fields.get("imatrix.datasets")
    if ds is not None:
        im.datasets = [bytes(ds.parts[i]).decode("utf-8", errors="replace") for i in ds.data]
    tensors = {t.name: t for t in r.tensors}
    for tname, t in tensors.items():
        if not tname.endswith(".in_sum2"):
            continue
        name = tname[: -len(".in_sum2")]
        counts = tensors.get(f"{name}.counts")
        if counts is None:
            raise IMatrixError(f"{path}: {tname} has no {name}.counts beside it; the file is corrupt")
        c = torch.from_numpy(np.asarray(counts.data, dtype=np.float64).reshape(-1).copy())
        sums = torch.from_numpy(np.asarray(t.data, dtype=np.float64).copy()).reshape(c.numel(), -1)
        im.entries[name] = Entry(sums, c.round())
    if not im.entries:
        raise IMatrixError(f"{path}: a GGUF file without imatrix entries (*.in_sum2); it is not an imatrix file")
    return im


def read(path: str | Path, chunk_size: int = 512) -> IMatrix:
    """An imatrix file in either format (GGUF by its magic, else legacy .dat). The legacy format does not store
    the chunk size; `chunk_size` (llama.cpp's -c, 512 by default) only scales sums and counts alike."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise IMatrixError(f"{path}: cannot read the imatrix file ({exc.strerror})") from None
    if data[:4] == GGUF_MAGIC:
        return _read_gguf(path)
    return _read_dat(data, path, chunk_size)


def write(im: IMatrix, path: str | Path) -> Path:
    """GGUF when the name ends in .gguf, else the legacy .dat layout (llama-imatrix's rule of thumb)."""
    return write_gguf(im, path) if str(path).endswith(".gguf") else write_dat(im, path)


# -- collecting ---------------------------------------------------------------------------------------------------


class Collector:
    """Forward hooks that add each matrix product's inputs to an IMatrix while the model runs.

    `linears` maps GGUF names to modules whose first argument is the product's input (..., n);
    `experts` maps a stack of experts (model/moe.py Experts, called as experts(x, e)) to the GGUF names of its
    gate, up and down stacks: the down stack's input, silu(x W_gate) * (x W_up), is recomputed from x.
    """

    def __init__(self, im: IMatrix, linears: dict[str, nn.Module], experts: dict[nn.Module, tuple[str, str, str]]):
        self.im = im
        self.handles = []
        for name, mod in linears.items():
            self.handles.append(mod.register_forward_pre_hook(self._linear(name)))
        for mod, names in experts.items():
            self.handles.append(mod.register_forward_pre_hook(self._experts(mod, names)))

    def _linear(self, name: str):
        def hook(_mod, args):
            self.im.add(name, args[0])
        return hook

    def _experts(self, mod: nn.Module, names: tuple[str, str, str]):
        gate, up, down = names
        n_exp = mod.moe_w_in_eD_F.shape[0]

        def hook(_mod, args):
            x, e = args[0], int(args[1])
            self.im.add(gate, x, e, n_exp)
            self.im.add(up, x, e, n_exp)
            h = F.silu(x @ mod.moe_w_in_eD_F[e]) * (x @ mod.moe_w_swiglu_eD_F[e])
            self.im.add(down, h, e, n_exp)
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


__all__ = ["Collector", "Entry", "IMatrix", "IMatrixError", "read", "write", "write_dat", "write_gguf"]
