"""Weight-only int8 / int4 products on CPU through the native library (native/weight_only.c, weight_only_a8.c).

Why: a decode step reads every weight once, so int8 and int4 codes should make it 2x and ~3.5x faster than
bf16; torch's one-row kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) are compute-bound and
run at about half the bf16 speed instead (BENCHMARKS.md, issue 18). `lh_wo_int8` / `lh_wo_int4` widen the
codes in registers. By default (`INT16_ACTIVATIONS`) each activation row is rounded to int16 on its own scale
and multiplied with AVX-512 VNNI integer dot products (exact integer sums; each activation off by at most
amax / 65534 of its row, below its own bf16 rounding unless it is under amax / 128): on this loaded 2-core
machine the float path is bound by instructions, not bytes. With it off, the activations stay float32 and the
products are those of the dequantised weights, only the float32 summation order differing from the reference.
With `INT8_ACTIVATIONS` (the default; int4 weights with K a multiple of 128, int8 weights with K a multiple of
32) the rows are instead quantized to llama.cpp's Q8_0 blocks (int8 codes, one float16 scale per 32 elements)
and the codes multiplied as stored (weight_only_a8.c): fewer integer instructions than the int16 path, at the
activation error of llama.cpp's own Q4_0 / Q8_0 products. `activation_mode()` is what both callers pass: this
file's `Codes` and the one-call step.

The codes are read in place, in the portable layout of `quant/weight_only.py` (`qweight`, `scales`,
`zeros`): no kernel copy of the weights is made. `applies(x)` is the condition for the native path: a CPU
float32 or bf16 input of 1..MAX_ROWS rows, no autograd graph, the library built and switched on (`ENABLED`,
or `llamaherd.native.disabled()` for every kernel). The callers (`quant.weight_only.Int8Linear` /
`Int4Linear`) keep torch's kernels for everything else (prefill, CUDA), and as the reference.
"""

from __future__ import annotations

import ctypes
import sys

import torch

from .. import native

MAX_ROWS = 16  # weight_only.c's LH_WO_MAX_M: more rows (prefill) go to torch's GEMM kernels
ENABLED = True  # this file's kernels alone; `native.switched_off(weight_only)` runs torch's instead
# int8 and int4 weights: activations rounded to int16 per row (amax / 32767) and multiplied with VNNI integer dot
# products (weight_only.c: a third of the float path's instructions for int8, less than half for int4; each
# activation moves by at most amax / 65534, below the bf16 rounding of every element over amax / 128).
# False: float32 activations, the exact products of the dequantised weights (the GPTQ / AWQ exactness tests),
# whatever INT8_ACTIVATIONS says.
INT16_ACTIVATIONS = True
# int4 and int8 weights, integer activations on: int8 codes per 32 elements (llama.cpp's Q8_0 blocks,
# weight_only_a8.c) instead of int16 codes per row. False: the int16 path (weight_only.c).
# Measured on the 1B shape (BENCHMARKS.md, issue 18): int4 2.7-3.1x / 2.7-2.9x our bf16 decode at 1 / 2 threads
# against int16's 1.8-1.9x / 1.6-1.9x in the same runs, KLD to bf16 0.1642 against 0.1647 (the 4-bit weights'
# error dwarfs the activations'); int8 1.73-2.06x / 1.95-2.30x against int16's 1.47-1.49x / 1.61-1.66x, KLD
# 0.0024 against 0.0018 (Q8_0's activation error adds a third to the 8-bit weights'). On by default, as llama.cpp
# rounds the activations of its own 4-bit and 8-bit types; the tests that compare against float references at 1e-3
# pin int16.
INT8_ACTIVATIONS = True


def activation_mode() -> int:
    """The activation kind the switches ask for (weight_only.h's LH_WO_ACT_*: 0 float32, 1 int16, 2 int8)."""
    return 0 if not INT16_ACTIVATIONS else 2 if INT8_ACTIVATIONS else 1


_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {
    "lh_wo_int8": [_int, _ptr, _int, _i64, _i64, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _int, _int, _int],
    "lh_wo_int4": [_int, _ptr, _int, _i64, _i64, _ptr, _ptr, _ptr, _int, _ptr, _i64, _i64, _ptr, _ptr, _int, _int,
                   _int],
    "lh_wo_grouped8": [_int, _ptr, _int, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _ptr, _ptr, _int, _int],
    "lh_wo_avx512": [],
    "lh_wo_vnni": [],
}


def _fn(name: str):
    return native.function(name, _SIGNATURES[name])


def available() -> bool:
    """Whether the kernels are built and switched on."""
    return ENABLED and native.library() is not None


def uses_avx512() -> bool:
    """Whether the build has the AVX-512 paths (False: the portable C loops)."""
    return available() and bool(_fn("lh_wo_avx512")())


def applies(x: torch.Tensor, in_features: int) -> bool:
    """Whether `x` (..., in_features) goes to the native kernels (see the module docstring)."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.dim() >= 1
        and x.shape[-1] == in_features
        and 0 < x.numel() <= MAX_ROWS * in_features
        and not (torch.is_grad_enabled() and x.requires_grad)
        and available()
    )


class Codes:
    """One native call's weights (one projection, or siblings fed one input): validated once, held as arguments.

    `members` are, per scheme: "int8" (qweight int8 (N, K), scales bf16 (N,)); "int4" (qweight uint8 (N, K/2),
    scales, zeros (K/g, N), all bf16 or all float32); "grouped8" (qweight uint8 (N, K), float32 scales and zeros
    (K/g, N), w = q * s + z). The tensors are kept referenced, so the addresses stay valid while this object
    lives; `key` (the addresses) tells a caller when its modules' tensors were replaced and this must be rebuilt.
    """

    def __init__(self, members: list[tuple[torch.Tensor, ...]], scheme: str = "int8",
                 group_size: int | None = None) -> None:
        if scheme not in _PER_BYTE:
            raise ValueError(f"unknown weight-only scheme {scheme!r}; one of {sorted(_PER_BYTE)}")
        self.scheme, self.members, self.group_size = scheme, [tuple(m) for m in members], group_size
        self.K = self.members[0][0].shape[1] * _PER_BYTE[scheme]
        self.sz_f32 = scheme == "grouped8" or (scheme == "int4" and self.members[0][1].dtype == torch.float32)
        for m in self.members:
            _check_member(m, self.K, scheme, group_size, torch.float32 if self.sz_f32 else torch.bfloat16)
        self.ns = [m[0].shape[0] for m in self.members]
        self.offsets = [sum(self.ns[:i]) for i in range(len(self.ns))]
        self.total = sum(self.ns)
        self.key = key(self.members)
        self._args = [_array(_ptr, [m[i].data_ptr() for m in self.members]) for i in range(len(self.members[0]))]
        self._ns = _array(_i64, self.ns)

    def __call__(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """x (..., K) float32 or bf16 (1..MAX_ROWS rows, checked: `applies`) -> each member's (..., N)."""
        x2 = x.reshape(-1, x.shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        M = x2.shape[0]
        if x2.shape[1] != self.K or not 1 <= M <= MAX_ROWS or x2.dtype not in _X_DTYPES or not x2.is_cpu:
            raise ValueError(f"weight-only kernels take 1..{MAX_ROWS} CPU float32/bf16 rows of {self.K}, got "
                             f"{x2.dtype} {tuple(x2.shape)} on {x2.device}")
        out_dtype = out_dtype or x.dtype
        if out_dtype not in _X_DTYPES:
            raise ValueError(f"weight-only kernels write float32 or bfloat16, not {out_dtype}")
        buf = torch.empty(M * self.total, dtype=out_dtype)  # one allocation; each member's (M, N) is a slice
        base, size = buf.data_ptr(), buf.element_size() * M
        ys = [buf[o * M:(o + n) * M].view(*x.shape[:-1], n) for o, n in zip(self.offsets, self.ns)]
        outs = _array(_ptr, [base + size * o for o in self.offsets])
        common = (len(self.ns), x2.data_ptr(), int(x2.dtype == torch.float32), x2.stride(0), M)
        tail = (outs, self._ns, int(out_dtype == torch.bfloat16), torch.get_num_threads())
        if self.scheme == "int8":
            rc = _fn("lh_wo_int8")(*common, *self._args, self._ns, self.K, *tail[:3], activation_mode(), tail[3])
        elif self.scheme == "int4":
            rc = _fn("lh_wo_int4")(*common, *self._args, int(self.sz_f32), self._ns, self.K, self.group_size,
                                   *tail[:3], activation_mode(), tail[3])
        else:
            rc = _fn("lh_wo_grouped8")(*common, *self._args, self._ns, self.K, self.group_size, *tail)
        if rc != 0:
            raise MemoryError(f"lh_wo_{self.scheme} could not allocate its activation buffers")
        return ys


_X_DTYPES = (torch.float32, torch.bfloat16)
_PER_BYTE = {"int8": 1, "int4": 2, "grouped8": 1}  # codes a byte
_CODE_DTYPE = {"int8": torch.int8, "int4": torch.uint8, "grouped8": torch.uint8}
_GROUP_STEP = {"int4": 32, "grouped8": 16}  # what the group size must be a multiple of


def key(members) -> tuple:
    """The addresses and shapes a Codes object was built for."""
    return tuple((t.data_ptr(), tuple(t.shape)) for m in members for t in m)


def _array(ctype, values):
    return (ctype * len(values))(*values)


def _check_member(m: tuple[torch.Tensor, ...], K: int, scheme: str, group_size: int | None,
                  sz_dtype: torch.dtype) -> None:
    """What would make the C code read out of bounds."""
    q, per = m[0], _PER_BYTE[scheme]
    want = _CODE_DTYPE[scheme]
    if q.dtype != want or q.dim() != 2 or not q.is_contiguous() or q.shape[1] * per != K or not q.is_cpu:
        raise ValueError(f"codes must be contiguous CPU {want} (N, {K // per}), got {q.dtype} {tuple(q.shape)}")
    if scheme == "int8":
        shapes = [(q.shape[0],)]
    else:
        step = _GROUP_STEP[scheme]
        if not group_size or group_size % step or K % group_size:
            raise ValueError(f"{scheme} groups must be a multiple of {step} dividing K={K}, got {group_size}")
        shapes = [(K // group_size, q.shape[0])] * 2
    if len(m) != 1 + len(shapes):
        raise ValueError(f"{len(m)} tensors given for one {scheme} weight")
    for t, shape in zip(m[1:], shapes):
        if t.dtype != sz_dtype or tuple(t.shape) != shape or not t.is_contiguous() or not t.is_cpu:
            raise ValueError(f"scales/zeros must be contiguous CPU {sz_dtype} {shape}, got {t.dtype} {tuple(t.shape)}")


def int8(x: torch.Tensor, members, out_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """x (..., K) times each (qweight int8 (N, K), scales bf16 (N,)) transposed -> [(..., N)] (one-off calls)."""
    return Codes(members, "int8")(x, out_dtype)


def int4(x: torch.Tensor, members, group_size: int, out_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """x (..., K) times each (qweight uint8 (N, K/2), scales, zeros bf16 (K/g, N)) transposed -> [(..., N)]."""
    return Codes(members, "int4", group_size)(x, out_dtype)


def switched_off():
    """Run the enclosed code on torch's weight-only kernels (the reference), the other native kernels kept."""
    return native.switched_off(sys.modules[__name__])
