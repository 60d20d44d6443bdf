"""Weight-only int8 (per output channel) and int4 (grouped) quantization as post-load swaps over any model.

The codecs follow gpt-fast's `quantize.py` (pytorch-labs/gpt-fast), the layout torch's own weight-only
kernels expect:

    int8: w[n, k] ~= q[n, k] * scale[n]               q in [-128, 127], scale = absmax(row) / 127
    int4: w[n, k] ~= (q[n, k] - 8) * scale[g, n] + zero[g, n]      q in [0, 15], g = k // group_size,
          scale = (max - min) / 15 and zero = min + 8 * scale over the group (`get_group_qparams`)

Scales and zeros are rounded to bf16 before the weights are rounded against them (as gpt-fast stores them),
so the stored numbers are exactly the ones every device multiplies with. Few-row CPU products (decode, up to
16 rows) run on our kernels (native/weight_only.py: the codes widened in registers, float32 activations,
siblings fed one input such as wq/wk/wv computed in one call); the reference and everything else run on
`torch._weight_int8pack_mm` / `aten._weight_int4pack_mm_for_cpu` on the CPU and `aten._weight_int4pack_mm`
on CUDA (int8 on CUDA: the int8 matrix widened to the activation dtype, scaled after the dot product); the
kernel layouts are built on first use and are not part of the state dict, which holds only the portable
tensors (`qweight`, `scales`, `zeros`).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LlamaherdError
from ..model import llama
from ..native import weight_only as native_wo
from ..native.siblings import SiblingResults

GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 128  # torchao's int4_weight_only default


class QuantizeError(LlamaherdError, ValueError):
    """An unknown quantization scheme, or a model it cannot be applied to."""


def parse_scheme(spec: str) -> tuple[str, int | None]:
    """'int8' -> ('int8', None); 'int4' -> ('int4', 128); 'int4-g32' -> ('int4', 32)."""
    m = re.fullmatch(r"(int8)|(int4)(?:-g(\d+))?", spec.strip().lower()) if isinstance(spec, str) else None
    if m is None:
        raise QuantizeError(f"unknown quantization {spec!r}; use int8, int4, or int4-g32 / int4-g64 / int4-g128")
    if m.group(1):
        return "int8", None
    group = int(m.group(3) or DEFAULT_GROUP_SIZE)
    if group not in GROUP_SIZES:
        raise QuantizeError(f"int4 group size {group} is not supported; use one of {GROUP_SIZES}")
    return "int4", group


# -- codecs ------------------------------------------------------------------------------------------------


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (q int8 (N, K), scales bf16 (N,)), symmetric per output channel."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8).to(torch.bfloat16)
    q = torch.round(w / scales.float()[:, None]).clamp(-128, 127).to(torch.int8)
    return q, scales


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> (q uint8 (N, K/2) two values a byte, scales bf16 (K/g, N), zeros bf16 (K/g, N)).

    Byte j of a row holds q[2j] in its high nibble and q[2j+1] in its low one (the order torch's
    `_convert_weight_to_int4pack` takes).
    """
    N, K = w.shape
    g = w.float().reshape(N, K // group_size, group_size)
    lo, hi = g.amin(dim=2), g.amax(dim=2)  # (N, G)
    scales = ((hi - lo).clamp(min=1e-6) / 15).to(torch.bfloat16)
    zeros = (lo + 8 * scales.float()).to(torch.bfloat16)
    s, z = scales.float()[..., None], zeros.float()[..., None]
    q = torch.round((g - (z - 8 * s)) / s).clamp(0, 15).to(torch.uint8).reshape(N, K)
    return pack_nibbles(q), scales.t().contiguous(), zeros.t().contiguous()


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    return (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 values 0..15."""
    return torch.stack([packed >> 4, packed & 15], dim=2).reshape(packed.shape[0], -1)


def dequantize(module: nn.Module) -> torch.Tensor:
    """The float32 (N, K) matrix a quantized module multiplies by."""
    if isinstance(module, Int8Linear):
        return module.qweight.float() * module.scales.float()[:, None]
    q = unpack_nibbles(module.qweight).float()
    g = module.group_size
    s = module.scales.float().t().repeat_interleave(g, dim=1)
    z = module.zeros.float().t().repeat_interleave(g, dim=1)
    return (q - 8) * s + z


# -- modules -----------------------------------------------------------------------------------------------


def _empty(shape, dtype, device):
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class Int8Linear(nn.Module):
    """A bias-free Linear whose weight is int8 with one scale per output channel."""

    siblings: Siblings | None = None  # set by `group_siblings` for projections sharing their input

    def __init__(self, in_features: int, out_features: int, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.qweight = _empty((out_features, in_features), torch.int8, device)
        self.scales = _empty((out_features,), torch.bfloat16, device)
        self._scales: dict[torch.dtype, torch.Tensor] = {}

    @classmethod
    def from_linear(cls, weight: torch.Tensor) -> Int8Linear:
        new = cls(weight.shape[1], weight.shape[0], device="meta")
        q, s = quantize_int8(weight.detach())
        new.qweight, new.scales = _frozen(q), _frozen(s)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise QuantizeError(f"int8 weights multiply float activations, not {x.dtype}")
        if native_wo.applies(x, self.in_features):
            return _native(self, x)
        s = self._scales.get(x.dtype)
        if s is None:
            s = self._scales[x.dtype] = self.scales.to(x.dtype)
        if x.is_cpu:
            y = torch._weight_int8pack_mm(x2.contiguous(), self.qweight, s)
        else:  # the same numbers: the int8 matrix times x, then the channel scale
            y = F.linear(x2, self.qweight.to(x.dtype)) * s
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


class Int4Linear(nn.Module):
    """A bias-free Linear whose weight is int4 in groups of `group_size` input features (scale and zero each)."""

    siblings: Siblings | None = None

    def __init__(self, in_features: int, out_features: int, group_size: int, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.qweight = _empty((out_features, in_features // 2), torch.uint8, device)
        self.scales = _empty((groups, out_features), torch.bfloat16, device)
        self.zeros = _empty((groups, out_features), torch.bfloat16, device)
        self._kernel: tuple | None = None  # (device, dtype, packed weight, scales_and_zeros)

    @classmethod
    def from_linear(cls, weight: torch.Tensor, group_size: int) -> Int4Linear:
        new = cls(weight.shape[1], weight.shape[0], group_size, device="meta")
        q, s, z = quantize_int4(weight.detach(), group_size)
        new.qweight, new.scales, new.zeros = _frozen(q), _frozen(s), _frozen(z)
        return new

    def _layout(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel's packed weight and (K/g, N, 2) scales_and_zeros for x's device and dtype, built once."""
        k = self._kernel
        if k is not None and k[0] == x.device and k[1] == x.dtype:
            return k[2], k[3]
        q = self.qweight
        if x.is_cpu:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(q).to(torch.int32), 1)
        else:  # innerKTiles 8 when K allows, as torchao picks for int4_weight_only
            tiles = 8 if self.in_features % 1024 == 0 else (4 if self.in_features % 512 == 0 else 2)
            packed = torch.ops.aten._convert_weight_to_int4pack(q.to(x.device), tiles)
        sz = torch.stack([self.scales, self.zeros], dim=2).to(device=x.device, dtype=x.dtype).contiguous()
        self._kernel = (x.device, x.dtype, packed, sz)
        return packed, sz

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise QuantizeError(f"int4 weights multiply float activations, not {x.dtype}")
        if native_wo.applies(x, self.in_features):
            return _native(self, x)
        x2 = x.reshape(-1, shape[-1]).contiguous()
        if x.is_cpu:
            packed, sz = self._layout(x2)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, self.group_size, sz)
        else:  # the CUDA kernel takes bf16 activations only
            xb = x2.to(torch.bfloat16)
            packed, sz = self._layout(xb)
            y = torch.ops.aten._weight_int4pack_mm(xb, packed, self.group_size, sz).to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group {self.group_size}"


def _codes_of(m: nn.Module) -> tuple[torch.Tensor, ...]:
    return (m.qweight, m.scales) if isinstance(m, Int8Linear) else (m.qweight, m.scales, m.zeros)


def _group_of(m: nn.Module) -> int | None:
    return getattr(m, "group_size", None)


class _Native:
    """The native call arguments of some modules' codes, rebuilt only when a code tensor is replaced."""

    def __init__(self, members: list[nn.Module]) -> None:
        self.members = members
        self._codes: tuple[tuple, native_wo.Codes] | None = None

    def __getstate__(self) -> dict:  # copy.deepcopy / pickle: the ctypes arguments are transient
        return {"members": self.members}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["members"])

    def codes(self) -> native_wo.Codes:
        tensors = [_codes_of(m) for m in self.members]
        key = native_wo.key(tensors)
        if self._codes is None or self._codes[0] != key:
            # the kernels read bf16 scales: a model loaded with dtype=float32 holds them widened (exactly)
            bf16 = [(q, *(t.to(torch.bfloat16).contiguous() for t in rest)) for q, *rest in tensors]
            group = _group_of(self.members[0])
            self._codes = (key, native_wo.Codes(bf16, "int8" if group is None else "int4", group))
        return self._codes[1]


class Siblings(_Native):
    """Quantized projections applied to one tensor in turn (wq/wk/wv, w1/w3): the first call computes all.

    The protocol of `native.dense.DenseGroup` (`native.siblings.SiblingResults`): the others' results are kept
    for that very input tensor; any other input is computed by the member alone, so values never depend on
    the call order.
    """

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__(members)
        self._results = SiblingResults()

    def project(self, member: nn.Module, x: torch.Tensor) -> torch.Tensor:
        kept = self._results.take(member, x)
        if kept is not None:
            return kept
        self._results.clear()
        outs = dict(zip(self.members, self.codes()(x)))
        mine = outs.pop(member)
        self._results.keep(x, outs)
        return mine


def _native(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if module.siblings is not None:
        return module.siblings.project(module, x)
    alone = module.__dict__.get("_alone")
    if alone is None:
        alone = module._alone = _Native([module])
    return alone.codes()(x)[0]


# Sibling projections fed the same input (Meta names, llama-models `llama3/model.py`), as native/dense.py groups them.
SHARED_INPUT_NAMES = (("wq", "wk", "wv"), ("w1", "w3"))


def group_siblings(net: nn.Module) -> int:
    """Let quantized projections that share their input (same scheme and widths) run as one native call."""
    groups = 0
    for parent in net.modules():
        for names in SHARED_INPUT_NAMES:
            members = [getattr(parent, n, None) for n in names]
            kinds = {(type(m), m.in_features, _group_of(m)) if isinstance(m, (Int8Linear, Int4Linear)) else None
                     for m in members}
            if len(kinds) == 1 and None not in kinds:
                group = Siblings(members)
                for m in members:
                    m.siblings = group
                groups += 1
    return groups


class QuantizedVocabProjection(llama.VocabProjection):
    """The output layer over a quantized vocabulary matrix: ignores the float matrix it is handed, float32 logits."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.linear(h.float()).float()


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


# -- the swap ----------------------------------------------------------------------------------------------


def quantizable(name: str, module: nn.Module, scheme: str, group_size: int | None) -> bool:
    """A bias-free 2-D Linear (every projection of every family) whose widths the kernels take."""
    if not isinstance(module, nn.Linear) or module.bias is not None or name.split(".")[-1] == "output":
        return False  # the untied output matrix is projected through `project`, not called
    K = module.in_features
    return K % 2 == 0 if scheme == "int8" else K % group_size == 0


def make_module(scheme: str, group_size: int | None, weight: torch.Tensor) -> nn.Module:
    return Int8Linear.from_linear(weight) if scheme == "int8" else Int4Linear.from_linear(weight, group_size)


def empty_module(scheme: str, group_size: int | None, out_features: int, in_features: int) -> nn.Module:
    if scheme == "int8":
        return Int8Linear(in_features, out_features, device="meta")
    return Int4Linear(in_features, out_features, group_size, device="meta")


def quantize(net: nn.Module, spec: str) -> list[str]:
    """Replace every quantizable Linear of a loaded model (and its vocabulary projection) in place; return names.

    Call it before `native.swaps.apply`: the native swaps match exact reference types, so they leave these
    modules alone. Vision towers and MoE expert banks (3-D parameters, not Linears) stay in float.
    """
    scheme, group = parse_scheme(spec)
    done = []
    for parent_name, parent in list(net.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if quantizable(full, child, scheme, group):
                setattr(parent, name, make_module(scheme, group, child.weight))
                done.append(full)
    project = getattr(net, "project", None)
    if type(project) is llama.VocabProjection and hasattr(net, "output_weight"):
        w = net.output_weight()
        if w.shape[1] % (group or 2) == 0:
            net.project = QuantizedVocabProjection(make_module(scheme, group, w))
            done.append("project.linear")
    if not done:
        raise QuantizeError(f"nothing in this model can be quantized to {spec}: no bias-free Linear fits the kernels")
    group_siblings(net)
    return done


__all__ = ["Int4Linear", "Int8Linear", "QuantizeError", "QuantizedVocabProjection", "Siblings", "dequantize",
           "group_siblings", "parse_scheme", "quantize", "quantize_int4", "quantize_int8"]
