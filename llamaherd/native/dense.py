"""bf16 matrix-vector products on CPU through the native library (llamaherd/native/dense.c), and the swap using them.

Why: decoding multiplies one activation row (or a few) by every weight matrix, so a step is bound by how fast
the weights stream from memory. torch's bf16 `F.linear` for one row reads ~22 GB/s here, `lh_bf16_gemv`
reads ~58 GB/s, the machine's streaming bandwidth (bench/PROFILE.md section 9, bench/dense_gemv.py).

`applies(x, w)` is the one condition for the native path: CPU tensors, bf16 weight and input, the weight a plain
2-D tensor with unit stride along K, no autograd graph to record, at most MAX_ROWS rows, and the library built
and switched on (`llamaherd.native.disabled()` turns it off). Anything else goes to `F.linear`, so GPU models,
training, prefill of long prompts and machines without a compiler keep the torch path. Results differ from
torch's only in float32 summation order (and, for bf16 outputs, in the rounding that follows).

`swap_dense(net)` is applied once loading finishes (checkpoint/base.materialize): bias-free `nn.Linear`
modules become `DenseLinear` (same parameter object, same state dict) and a model's vocab projection hook
`project` (model/llama.py) becomes `logits`, which also skips the bf16 -> float32 conversion of the logits.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from .. import native

MAX_ROWS = 16  # lh_bf16_gemv's bound; more rows (prefill) are a GEMM, where oneDNN's bf16 kernels win

_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {
    "lh_bf16_gemv": [_ptr, _i64, _i64, _ptr, _i64, _i64, _i64, _ptr, _i64, _int, _int],
    "lh_bf16_gemv_many": [_int, _ptr, _i64, _i64, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _int, _int],
    "lh_bf16_native": [],
}
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
    K, N = w.shape[1], w.shape[0]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if not (1 <= M <= MAX_ROWS) or w.stride(1) != 1 or x2.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
        raise ValueError(f"lh_bf16_gemv wants bf16 x (1..{MAX_ROWS}, {K}) and bf16 w (N, {K}) with unit K stride")
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"lh_bf16_gemv writes float32 or bfloat16, not {out_dtype}")
    y = torch.empty(*x.shape[:-1], N, dtype=out_dtype)
    _fn("lh_bf16_gemv")(x2.data_ptr(), x2.stride(0), M, w.data_ptr(), w.stride(0), N, K, y.data_ptr(), N,
                        int(out_dtype == torch.bfloat16), torch.get_num_threads())
    return y


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, w)` without bias, through the kernel when it applies (bf16 out, as torch's)."""
    return gemv(x, w) if applies(x, w) else F.linear(x, w)


def logits(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The vocab projection: float32 straight from the kernel's sums when it applies, else `F.linear`'s dtype.

    Returning float32 is both cheaper (no bf16 rounding then widening of the logits) and closer to the exact
    product; the model's `.float()` is then a no-op.
    """
    return gemv(h, w, torch.float32) if applies(h, w) else F.linear(h, w)


class DenseLinear(nn.Linear):
    """A bias-free `nn.Linear` that sends few-row bf16 CPU products to `lh_bf16_gemv` (else `F.linear`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.bias is None and applies(x, w):
            return gemv(x, w)
        return F.linear(x, w, self.bias)


def swap_dense(net: nn.Module) -> int:
    """Point a loaded model's bf16 CPU bias-free Linears (and its `project` hook) at the kernel; return how many.

    A swap, not a fork of the model: the model code still calls `self.wq(x)` and `self.project(h, w)`; the
    new modules hold the very same Parameter objects, so the state dict keys and tensors are unchanged.
    Nothing is swapped when the library is unavailable (no compiler, or switched off).
    """
    if not available():
        return 0
    swapped = 0
    for parent in list(net.modules()):
        for name, mod in list(parent.named_children()):
            if type(mod) is not nn.Linear or mod.bias is not None:
                continue
            w = mod.weight
            if w.dtype != torch.bfloat16 or w.device.type != "cpu":
                continue
            new = DenseLinear(mod.in_features, mod.out_features, bias=False, device="meta")
            new.weight = w  # the same Parameter: state dict values and identity unchanged
            new.train(mod.training)
            setattr(parent, name, new)
            swapped += 1
    if callable(getattr(net, "project", None)):
        net.project = logits
        swapped += 1
    return swapped
