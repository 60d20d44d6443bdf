"""bf16 matrix-vector products on CPU through the native library (llamaherd/native/dense.c), and the swap using them.

Why: decoding multiplies one activation row (or a few) by every weight matrix, so a step is bound by how fast
the weights stream from memory. `lh_bf16_gemv` reads weights at about the machine's streaming read bandwidth
(40-46 GB/s measured beside a 42-44 GB/s plain read), torch's bf16 `F.linear` for one row at 25-31 GB/s
(bench/PROFILE.md section 9, bench/dense_gemv.py).

`applies(x, w)` is the one condition for the native path: CPU tensors, bf16 weight and input, the weight a plain
2-D tensor with unit stride along K, no autograd graph to record, at most MAX_ROWS rows, and the library built
and switched on (`llamaherd.native.disabled()` turns it off). Anything else goes to `F.linear`, so GPU models,
training, prefill of long prompts and machines without a compiler keep the torch path. Results differ from
torch's only in float32 summation order (and, for bf16 outputs, in the rounding that follows).

`swap_dense(net)` is one of the post-load swaps (`native/swaps.py`, applied by `llamaherd.load`): bias-free
`nn.Linear` modules become `DenseLinear` (same parameter object, same state dict), and siblings fed one input
(wq/wk/wv, w1/w3) are grouped into one native call (`DenseGroup`). The vocabulary projection is swapped
there too (`swaps.NativeVocabProjection`, float32 logits straight from the kernel's sums).
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from .. import native
from .siblings import SiblingResults

MAX_ROWS = 16  # lh_bf16_gemv's bound; more rows (prefill) are a GEMM, where oneDNN's bf16 kernels win

_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {
    "lh_bf16_gemv": [_ptr, _i64, _i64, _ptr, _i64, _i64, _i64, _ptr, _i64, _int, _int],
    "lh_bf16_gemv_many": [_int, _ptr, _i64, _i64, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _int, _int],
    "lh_bf16_native": [],
}
# Sibling projections fed the same input (Meta names, llama-models `llama3/model.py`), as quant/ggml.py groups them.
SHARED_INPUT_NAMES = (("wq", "wk", "wv"), ("w1", "w3"))
_PLAIN = (torch.Tensor, nn.Parameter)  # subclasses (packed ggml weights) bring their own F.linear


def _fn(name: str):
    return native.function(name, _SIGNATURES[name])


def available() -> bool:
    """Whether the native library is built and switched on."""
    return native.library() is not None


def uses_bf16_instructions() -> bool:
    """Whether the build has the AVX512_BF16 path (False: the portable float32 loop)."""
    return available() and bool(_fn("lh_bf16_native")())


def applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `x @ w.T` goes to the native kernel (see the module docstring for why each clause)."""
    return (
        x.dtype == torch.bfloat16
        and w.dtype == torch.bfloat16
        and type(w) in _PLAIN
        and x.device.type == "cpu"
        and w.device.type == "cpu"
        and w.dim() == 2
        and w.stride(1) == 1
        and x.dim() >= 1
        and x.shape[-1] == w.shape[1]
        and x.numel() <= MAX_ROWS * w.shape[1]
        and x.numel() > 0
        and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
        and available()
    )


def gemv(x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x (..., K) bf16 times w (N, K) bf16 transposed -> (..., N) in `out_dtype` (float32 or bfloat16).

    Callers check `applies(x, w)` first; this only re-checks what would make the C code read out of bounds.
    """
    if w.dim() != 2 or x.dim() < 1 or x.shape[-1] != w.shape[1] or w.stride(1) != 1 \
            or x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16 or not (x.is_cpu and w.is_cpu) \
            or not 1 <= x.numel() // max(w.shape[1], 1) <= MAX_ROWS:
        raise ValueError(f"lh_bf16_gemv wants CPU bf16 x (1..{MAX_ROWS} rows, K) and w (N, K) with unit K stride, "
                         f"got {x.dtype} {tuple(x.shape)} on {x.device} and {w.dtype} {tuple(w.shape)} on {w.device}")
    K, N = w.shape[1], w.shape[0]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"lh_bf16_gemv writes float32 or bfloat16, not {out_dtype}")
    y = torch.empty(*x.shape[:-1], N, dtype=out_dtype)
    _fn("lh_bf16_gemv")(x2.data_ptr(), x2.stride(0), M, w.data_ptr(), w.stride(0), N, K, y.data_ptr(), N,
                        int(out_dtype == torch.bfloat16), torch.get_num_threads())
    return y


class DenseLinear(nn.Linear):
    """A bias-free `nn.Linear` that sends few-row bf16 CPU products to `lh_bf16_gemv` (else `F.linear`)."""

    group: DenseGroup | None = None  # set by `swap_dense` for projections sharing their input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.bias is None and applies(x, w):
            return gemv(x, w) if self.group is None else self.group.project(self, x)
        return F.linear(x, w, self.bias)


class DenseGroup:
    """DenseLinears applied to one tensor in turn (wq/wk/wv, w1/w3): the first call computes all in one native call.

    The same protocol as `quant.ggml.SharedInput` (`native.siblings.SiblingResults`): the other members'
    results are kept for that very input tensor; any other input is computed by the member alone, so the
    values never depend on the call order. Saves one OpenMP fork/join (and its end-of-matrix load imbalance) and one Python round trip per
    extra member (bench/PROFILE.md section 9).
    """

    def __init__(self, members: list[DenseLinear]) -> None:
        self.members = members
        self._results = SiblingResults()
        self._args: tuple[tuple, tuple] | None = None

    def __getstate__(self) -> dict:  # copy.deepcopy / pickle: the kept results and ctypes arrays are transient
        return {"members": self.members}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["members"])

    def project(self, member: DenseLinear, x: torch.Tensor) -> torch.Tensor:
        kept = self._results.take(member, x)
        if kept is not None:
            return kept
        self._results.clear()
        if not all(applies(x, m.weight) for m in self.members):
            return gemv(x, member.weight)
        weights, ns, lds, total = self._weights()
        K = member.in_features
        x2 = x.reshape(-1, K)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        M = x2.shape[0]
        buf = torch.empty(M * total, dtype=torch.bfloat16)  # one allocation; each member's (M, N) is a slice
        base, outs, offset = buf.data_ptr(), [], 0
        for m in self.members:
            outs.append(buf[offset : offset + M * m.out_features].view(*x.shape[:-1], m.out_features))
            offset += M * m.out_features
        ptrs = (ctypes.c_void_p * len(outs))(*(base + 2 * M * o for o in self._offsets))
        _fn("lh_bf16_gemv_many")(len(outs), x2.data_ptr(), x2.stride(0), M, weights, lds, ns, K, ptrs, ns, 1,
                                 torch.get_num_threads())
        results = dict(zip(self.members, outs))
        mine = results.pop(member)
        self._results.keep(x, results)
        return mine

    def _weights(self):
        """The members' weights as native call arguments, rebuilt only when a weight's memory changes.

        Keyed by address, shape and row stride, not by the Parameter object: `module.to(dtype)` keeps the
        Parameter and swaps its storage, and a stale address would be read after it was freed.
        """
        current = tuple(m.weight for m in self.members)
        key = tuple((w.data_ptr(), w.shape[0], w.stride(0)) for w in current)
        if self._args is None or key != self._args[0]:
            n = len(current)
            ns = [w.shape[0] for w in current]
            self._offsets = [sum(ns[:i]) for i in range(n)]
            self._args = (key, ((ctypes.c_void_p * n)(*(w.data_ptr() for w in current)),
                                    (ctypes.c_int64 * n)(*ns), (ctypes.c_int64 * n)(*(w.stride(0) for w in current)),
                                    sum(ns)))
        return self._args[1]


def swap_dense(net: nn.Module) -> int:
    """Point a loaded model's bf16 CPU bias-free Linears at the kernel; return how many.

    A swap, not a fork of the model: the model code still calls `self.wq(x)`; the new modules hold the very same Parameter objects, so the state dict keys and tensors are unchanged.
    Models without such Linears (float32, GPU, packed GGUF weights) are left alone without building the
    library; nothing is swapped when it is unavailable (no compiler, or switched off).
    """
    found = [
        (parent, name, mod)
        for parent in net.modules()
        for name, mod in parent.named_children()
        if type(mod) is nn.Linear and mod.bias is None
        and mod.weight.dtype == torch.bfloat16 and mod.weight.device.type == "cpu"
    ]
    if not found or not available():
        return 0
    for parent, name, mod in found:
        new = DenseLinear(mod.in_features, mod.out_features, bias=False, device="meta")
        new.weight = mod.weight  # the same Parameter: state dict values and identity unchanged
        new.train(mod.training)
        setattr(parent, name, new)
    for parent in net.modules():
        for names in SHARED_INPUT_NAMES:
            members = [getattr(parent, n, None) for n in names]
            if all(type(m) is DenseLinear for m in members) and len({m.in_features for m in members}) == 1:
                group = DenseGroup(members)
                for m in members:
                    m.group = group
    return len(found)
