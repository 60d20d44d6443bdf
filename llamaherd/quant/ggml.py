"""Packed ggml weights (GGUF) used as they are: a tensor type and Linear/Embedding swaps that decode on the fly.

`GGMLWeight` is the packed bytes, (rows, row_bytes) uint8, tagged with their ggml type. `F.linear` and
`F.embedding` on it decode block-rows in bounded chunks to the activation dtype, so a float copy of the
weight never exists whole, whether the model calls its Linear module or uses the weight directly (a tied
output projection `F.linear(h, tok_embeddings.weight)`). `.float()` / `.to(float dtype)` return the decoded
values; other operations see the raw bytes (row slices and device moves stay GGMLWeight).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..gguf_file import GGMLType, ggml_type
from ..native import ggml_kernels
from ..native.siblings import SiblingResults
from .ggml_quants import dequantize

# Elements decoded at once by a linear layer: 256K float32 = 1 MiB of scratch per chunk. Larger chunks
# (16 MiB) left glibc holding ~250 MB of freed heap after one forward of Gemma 3 270M (measured).
CHUNK_ELEMENTS = 1 << 18


_TO_FLOAT = {torch.Tensor.float: torch.float32, torch.Tensor.half: torch.float16,
             torch.Tensor.bfloat16: torch.bfloat16, torch.Tensor.double: torch.float64}


class GGMLWeight(torch.Tensor):
    """Packed ggml rows (rows, row_bytes) uint8 that behave as a (rows, n_cols) float weight in linear/embedding."""

    qtype: GGMLType

    @staticmethod
    def __new__(cls, packed: torch.Tensor, qtype: int | str | GGMLType) -> GGMLWeight:
        if packed.dtype != torch.uint8 or packed.dim() != 2:
            raise TypeError(f"GGMLWeight wants (rows, row_bytes) uint8, got {packed.dtype} {tuple(packed.shape)}")
        t = torch.Tensor._make_subclass(cls, packed, False)  # shares the bytes (an mmap'd file region)
        t.qtype = ggml_type(qtype)
        return t

    @property
    def n_cols(self) -> int:
        return self.shape[-1] // self.qtype.type_size * self.qtype.block_size

    def plain(self) -> torch.Tensor:
        """The bytes as an ordinary uint8 tensor (same storage)."""
        with torch._C.DisableTorchFunctionSubclass():
            return self.view(self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.plain(), self.qtype, dtype)

    def __repr__(self, *, tensor_contents=None) -> str:
        return f"GGMLWeight({self.qtype.name}, rows={self.shape[0]}, cols={self.n_cols}, device={self.device})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return _linear(*args, **kwargs)
        if func is F.embedding:
            return _embedding(*args, **kwargs)
        src = next(a for a in (*args, *kwargs.values()) if isinstance(a, GGMLWeight))
        # Asking for floats means asking for the values, never the bytes reinterpreted: decode.
        if func in _TO_FLOAT:
            return src.dequantize(_TO_FLOAT[func])
        if func is torch.Tensor.to:
            dtype = next((a for a in (*args[1:], *kwargs.values()) if isinstance(a, torch.dtype)), None)
            if dtype is not None and dtype.is_floating_point:
                device = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
                out = src.dequantize(dtype)
                return out if device is None else out.to(device)
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        # Byte-preserving results (to(device), detach, row slices, clone) keep their meaning; others are bytes.
        if type(out) is torch.Tensor and out.dtype == torch.uint8 and out.dim() == 2 and out.shape[-1] == src.shape[-1]:
            return GGMLWeight(out, src.qtype)
        return out


def _linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if not isinstance(w, GGMLWeight):
        raise TypeError("a packed ggml weight may only be the weight argument of F.linear")
    packed, rows = w.plain(), w.shape[0]
    if x.device.type == "cpu" and not x.requires_grad and ggml_kernels.available(w.qtype.id):
        # Native kernels read the packed blocks directly (native/ggml_kernels.py; bench/PROFILE.md); same values, faster.
        with torch._C.DisableTorchFunctionSubclass():
            out = ggml_kernels.linear(x, packed, w.qtype.id, w.n_cols)
            return out if bias is None else out + bias
    step = max(1, CHUNK_ELEMENTS // w.n_cols)
    with torch._C.DisableTorchFunctionSubclass():
        if step >= rows:
            out = F.linear(x, dequantize(packed, w.qtype, x.dtype))
        else:
            out = torch.cat(
                [F.linear(x, dequantize(packed[i : i + step], w.qtype, x.dtype)) for i in range(0, rows, step)], dim=-1
            )
        return out if bias is None else out + bias


def _embedding(ids: torch.Tensor, w: torch.Tensor, padding_idx=None, max_norm=None, *_, **__) -> torch.Tensor:
    if not isinstance(w, GGMLWeight) or max_norm is not None:
        raise TypeError("a packed ggml weight supports plain lookups only (no max_norm)")
    with torch._C.DisableTorchFunctionSubclass():
        rows = w.plain()[ids.reshape(-1)]  # (N, row_bytes)
        return dequantize(rows, w.qtype).reshape(*ids.shape, w.n_cols)


class GGMLLinear(nn.Module):
    """A bias-free Linear whose `weight` buffer is a GGMLWeight (out_features, row_bytes)."""

    def __init__(self, in_features: int, out_features: int, qtype: int | str | GGMLType, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.qtype = ggml_type(qtype)
        if in_features % self.qtype.block_size:
            raise CheckpointError(None, f"{self.qtype.name} rows need a multiple of {self.qtype.block_size} columns, got {in_features}")
        packed = torch.empty(out_features, self.qtype.row_bytes(in_features), dtype=torch.uint8, device=device)
        self.register_buffer("weight", GGMLWeight(packed, self.qtype))
        self.shared_input: SharedInput | None = None  # set by `group_shared_inputs`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _native(x, self.qtype):
            # Straight to the kernel: F.linear on the subclass would pay __torch_function__ dispatch per call.
            if self.shared_input is not None:
                return self.shared_input.project(self, x)
            return ggml_kernels.linear(x, self.weight.plain(), self.qtype.id, self.in_features)
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype.name}"


def _native(x: torch.Tensor, qtype: GGMLType) -> bool:
    """Whether `ggml_kernels` can take this product (the condition `_linear` also applies)."""
    return x.device.type == "cpu" and not x.requires_grad and ggml_kernels.available(qtype.id)


# Sibling projections that every architecture here feeds the same input (Meta names: llama-models
# `llama3/model.py` Attention.forward and FeedForward.forward; gemma3.py and llama4.py alike).
SHARED_INPUT_NAMES = (("wq", "wk", "wv"), ("w1", "w3"))


class SharedInput:
    """GGMLLinears that are applied to one tensor in turn: the first call computes all of them in one native call.

    The other members' results are kept for that very input tensor (`native.siblings.SiblingResults`); any
    other input, or more rows than `ggml_kernels.use_gemv` takes, is computed by the member alone,
    so the values never depend on the call order. The members keep their names and buffers: the state dict
    is unchanged. Saves one OpenMP fork/join and one Python round trip per extra member (bench/PROFILE.md).
    """

    def __init__(self, members: list[GGMLLinear]) -> None:
        self.members = members
        self._results = SiblingResults()
        self._native: tuple[tuple[torch.Tensor, ...], ggml_kernels.Weights] | None = None

    def __getstate__(self) -> dict:  # copy.deepcopy / pickle: the kept results are per thread and transient
        return {"members": self.members}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["members"])

    def project(self, member: GGMLLinear, x: torch.Tensor) -> torch.Tensor:
        kept = self._results.take(member, x)
        if kept is not None:
            return kept
        K = member.in_features
        x2 = x.reshape(-1, K)  # (M, K)
        if not ggml_kernels.use_gemv(x2.shape[0]):
            self._results.clear()
            return ggml_kernels.linear(x, member.weight.plain(), member.qtype.id, K)
        outs = ggml_kernels.gemv_many(x2.float(), self._weights(), K)
        lead = x.shape[:-1]
        results = {m: o.view(*lead, m.out_features).to(x.dtype) for m, o in zip(self.members, outs)}
        mine = results.pop(member)
        self._results.keep(x, results)
        return mine


    def _weights(self) -> ggml_kernels.Weights:
        """The members' packed weights as native call arguments, rebuilt only when a weight tensor is replaced."""
        current = tuple(m.weight for m in self.members)
        if self._native is None or any(a is not b for a, b in zip(current, self._native[0])):
            self._native = (current, ggml_kernels.Weights([(w.plain(), m.qtype.id) for w, m in zip(current, self.members)]))
        return self._native[1]


def group_shared_inputs(net: nn.Module) -> int:
    """Join sibling GGMLLinears named in SHARED_INPUT_NAMES (same in_features, native types) into SharedInputs.

    A swap applied after the model is built: the model code still calls each projection by its own name.
    Returns the number of groups formed.
    """
    groups = 0
    for parent in net.modules():
        for names in SHARED_INPUT_NAMES:
            members = [getattr(parent, n, None) for n in names]
            if not all(isinstance(m, GGMLLinear) for m in members):
                continue
            if len({m.in_features for m in members}) != 1 or not all(m.qtype.id in ggml_kernels.SUPPORTED for m in members):
                continue
            group = SharedInput(members)
            for m in members:
                m.shared_input = group
            groups += 1
    return groups


class GGMLEmbedding(nn.Module):
    """An Embedding whose `weight` buffer is a GGMLWeight; a lookup decodes only the rows asked for.

    Output is float32 until the module is cast with `.to(dtype)`.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, qtype: int | str | GGMLType, device=None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.qtype = ggml_type(qtype)
        if embedding_dim % self.qtype.block_size:
            raise CheckpointError(None, f"{self.qtype.name} rows need a multiple of {self.qtype.block_size} columns, got {embedding_dim}")
        packed = torch.empty(num_embeddings, self.qtype.row_bytes(embedding_dim), dtype=torch.uint8, device=device)
        self.register_buffer("weight", GGMLWeight(packed, self.qtype))
        self.out_dtype = torch.float32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).to(self.out_dtype)

    def _apply(self, fn, recurse=True):
        # Learn the floating dtype a cast asks for (module.to(dtype)) by applying it to a probe.
        probe = fn(torch.empty(0))
        if probe.is_floating_point():
            self.out_dtype = probe.dtype
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype.name}"


def swap_ggml(net: nn.Module, qtypes: dict[str, GGMLType]) -> None:
    """Replace the modules owning each quantized `<module>.weight` by their ggml counterparts, in place.

    Run on the weightless (meta-device) model before the packed weights are assigned. Sibling projections
    that share an input are then grouped for one native call (`group_shared_inputs`).
    """
    for name, qtype in qtypes.items():
        path, _, attr = name.rpartition(".")
        mod = net.get_submodule(path) if attr == "weight" else None
        device = getattr(getattr(mod, "weight", None), "device", None)
        if isinstance(mod, nn.Linear) and mod.bias is None:
            new: nn.Module = GGMLLinear(mod.in_features, mod.out_features, qtype, device=device)
        elif isinstance(mod, nn.Embedding):
            new = GGMLEmbedding(mod.num_embeddings, mod.embedding_dim, qtype, device=device)
        else:
            raise CheckpointError(None, f"quantized tensor {name} is not the weight of a bias-free Linear or an Embedding; "
                                  "only those may stay quantized")
        parent_path, _, child = path.rpartition(".")
        setattr(net.get_submodule(parent_path) if parent_path else net, child, new)
    group_shared_inputs(net)
