"""Matrix products on packed ggml weights through the native library (llamaherd/native/ggml.c).

Why native: a decode step is memory-bound, and the torch route (decode a chunk of blocks into a float matrix,
then `F.linear`) writes and re-reads 4-8x the packed bytes. PyTorch's own weight-only kernels do not fit: its
int8 kernel has one scale per output row (ggml has one per 32 or 16 elements) and its int4 CPU kernel measured
42 ms for one 262144 x 640 product here (bench/PROFILE.md). `lh_gemv` reads each packed block once.
Without a C compiler, or with `llamaherd.native.disabled()`, `available()` is False and callers keep the
pure-torch path; results differ only in float summation order.

Int8 activations (`INT8_ACTIVATIONS`, default True): `gemv` / `gemv_many` quantize each activation row once
per call to int8 blocks (llama.cpp's Q8_0 blocks of 32 for every weight type; llama.cpp itself takes blocks
of 256 for the K-quants, which ggml_q8.c's comment shows less accurate) and multiply integer codes with AVX-512 VNNI dot products (native/ggml_q8.c): up to
2-4x the float kernels' speed per packed byte for the 4-6 bit types (bench/PROFILE.md section 8). The price is
llama.cpp's: the product is that of the weights with the quantized activations, each activation off by up to
half a code step (amax/254 of its block), so outputs move by ~1e-3 of sum|w||x|. False keeps the
float-activation kernels (native/ggml.c), exact float32 activations, for comparisons with float math.
Many-row products (prefill, `linear` past MAX_GEMV_ROWS) do not use this switch.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import threading
from pathlib import Path

import torch

from .. import native

# ggml ids (ggml.h `enum ggml_type`) the C file decodes.
SUPPORTED = frozenset({2, 6, 8, 12, 13, 14})  # Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K
MAX_GEMV_ROWS = 64  # lh_gemv's bound; more rows go through dequantize + torch GEMM

_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {
    "lh_supported": [_int],
    "lh_dequant": [_int, _ptr, _i64, _i64, _i64, _ptr, _int],
    "lh_dequant_bf16": [_int, _ptr, _i64, _i64, _i64, _ptr, _int],
    "lh_gemv": [_int, _ptr, _i64, _i64, _i64, _ptr, _i64, _ptr, _int],
    "lh_gemv_many": [_int, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _i64, _ptr, _int],
    "lh_q8_gemv": [_int, _ptr, _i64, _i64, _i64, _ptr, _i64, _ptr, _int],
    "lh_q8_gemv_many": [_int, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _i64, _ptr, _int],
    "lh_q8_quantize": [_int, _ptr, _i64, _i64, _ptr, _ptr, _ptr],
    "lh_q8_vnni": [],
}

# Matrix-vector products with int8-quantized activations (llama.cpp's arithmetic, native/ggml_q8.c) when True;
# float32 activations (native/ggml.c) when False. The module docstring weighs the two.
INT8_ACTIVATIONS = True


def _gemv_names() -> tuple[str, str]:
    """The (one weight, many weights) native entry points that INT8_ACTIVATIONS selects."""
    return ("lh_q8_gemv", "lh_q8_gemv_many") if INT8_ACTIVATIONS else ("lh_gemv", "lh_gemv_many")


def _fn(name: str):
    return native.function(name, _SIGNATURES[name])


def library():
    """The native library, or None (no compiler, failed build, or switched off)."""
    return native.library()


disabled = native.disabled


def available(type_id: int) -> bool:
    return type_id in SUPPORTED and library() is not None


def _check(packed: torch.Tensor) -> None:
    if packed.device.type != "cpu" or packed.dtype != torch.uint8 or packed.dim() != 2 or packed.stride(1) != 1:
        raise ValueError(f"packed ggml rows must be a CPU (rows, row_bytes) uint8 tensor with unit column stride, "
                         f"got {packed.dtype} {tuple(packed.shape)} on {packed.device}")


def dequantize(packed: torch.Tensor, type_id: int, n_cols: int, dtype: torch.dtype = torch.float32,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """(N, row_bytes) packed rows -> (N, n_cols) float32 bit-identical to quant.ggml_quants.dequantize,
    or those values rounded to bfloat16 (`dtype=torch.bfloat16`, as `.bfloat16()` would round them); written
    into `out` (contiguous, N * n_cols elements of dtype) when given."""
    _check(packed)
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"native dequantize writes float32 or bfloat16, not {dtype}")
    shape = (packed.shape[0], n_cols)
    if out is None:
        out = torch.empty(shape, dtype=dtype)
    elif out.dtype != dtype or not out.is_contiguous() or out.numel() != shape[0] * shape[1]:
        raise ValueError(f"out must be a contiguous {dtype} tensor of {shape[0] * shape[1]} elements")
    out = out.view(shape)
    name = "lh_dequant" if dtype == torch.float32 else "lh_dequant_bf16"
    rc = _fn(name)(type_id, packed.data_ptr(), packed.shape[0], packed.stride(0), n_cols, out.data_ptr(),
                   torch.get_num_threads())
    if rc == -2:
        raise MemoryError(f"no memory for a {n_cols}-value row buffer while decoding")
    if rc != 0:
        raise ValueError(f"ggml type {type_id} has no native decoder")
    return out


def gemv(x: torch.Tensor, packed: torch.Tensor, type_id: int, n_cols: int) -> torch.Tensor:
    """x (M, n_cols) float32, M <= MAX_GEMV_ROWS, times the packed (N, row_bytes) weight transposed -> (M, N).

    With INT8_ACTIVATIONS the rows of x are first quantized to int8 blocks (llama.cpp's Q8_0 codes)."""
    _check(packed)
    x = x.contiguous()
    M, N = x.shape[0], packed.shape[0]
    if x.dtype != torch.float32 or x.shape[1] != n_cols or M > MAX_GEMV_ROWS:
        raise ValueError(f"gemv wants float32 (M <= {MAX_GEMV_ROWS}, {n_cols}), got {x.dtype} {tuple(x.shape)}")
    y = torch.empty(M, N, dtype=torch.float32)
    rc = _fn(_gemv_names()[0])(type_id, packed.data_ptr(), N, packed.stride(0), n_cols, x.data_ptr(), M, y.data_ptr(),
                           torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"ggml type {type_id} has no native matrix-vector kernel")
    return y


class Weights:
    """Several packed weights (packed (N_s, row_bytes) uint8, ggml type id) as the argument arrays of one native call.

    Built once per group of projections (`quant.ggml.SharedInput`) so that a call does not rebuild them.
    """

    def __init__(self, weights: list[tuple[torch.Tensor, int]]) -> None:
        for packed, _ in weights:
            _check(packed)
        S = len(weights)
        self.tensors = [p for p, _ in weights]  # keeps the bytes alive while the pointers are held
        self.types = [t for _, t in weights]
        self.sizes = [p.shape[0] for p, _ in weights]
        i64s = ctypes.c_int64 * S
        self.args = (S, (ctypes.c_int * S)(*self.types), (ctypes.c_void_p * S)(*(p.data_ptr() for p in self.tensors)),
                     i64s(*self.sizes), i64s(*(p.stride(0) for p in self.tensors)))


def gemv_many(x: torch.Tensor, weights: Weights, n_cols: int) -> list[torch.Tensor]:
    """[gemv(x, packed, type_id, n_cols) for each weight], in one native call and one OpenMP region.

    For weights that share an input (wq/wk/wv, w1/w3): one fork/join and one Python round trip instead of one
    per weight. Each result is its own contiguous (M, N_s) tensor, as `gemv` returns.
    """
    x = x.contiguous()
    M = x.shape[0]
    if x.dtype != torch.float32 or x.shape[1] != n_cols or M > MAX_GEMV_ROWS:
        raise ValueError(f"gemv_many wants float32 (M <= {MAX_GEMV_ROWS}, {n_cols}), got {x.dtype} {tuple(x.shape)}")
    flat = torch.empty(M * sum(weights.sizes), dtype=torch.float32)  # the results, one after another
    rc = _fn(_gemv_names()[1])(*weights.args, n_cols, x.data_ptr(), M, flat.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"ggml types {weights.types}: one has no native matrix-vector kernel")
    return [part.view(M, n) for part, n in zip(flat.split([M * n for n in weights.sizes]), weights.sizes)]


def _cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX), where oneDNN's bf16 GEMM is fast."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return torch.backends.mkldnn.is_available() and any(f in flags for f in (" avx512_bf16", " amx_bf16"))


# Prefill products in bfloat16: the weight chunks decoded to bf16, the activations rounded to bf16, oneDNN's
# bf16 GEMM accumulating in float32 (bench/PROFILE.md section 11: ~5x torch's float32 GEMM on this CPU).
# This is the same kind of trade llama.cpp makes, which quantizes activations to int8 blocks for every
# product; False keeps float32 activations and outputs (torch's float32 GEMM on the decoded weights).
BF16_PREFILL = _cpu_has_bf16()

# Weight elements decoded per chunk on the GEMM path: bounds the scratch to 8 MiB (float32) / 4 MiB (bf16).
_CHUNK_ELEMENTS = 1 << 21
# With bf16 GEMMs, products of more rows than this go to the GEMM: measured crossover ~24 rows for every type
# on Gemma's and the 1B's shapes (bench/PROFILE.md section 11); fewer stay on the int8 matrix-vector kernels.
BF16_GEMM_MIN_ROWS = 17

# Inside `float32_products()`, the products `use_gemv` sends to the GEMM take float32 weights, activations and
# outputs even where BF16_PREFILL is on.
# torch's CPU bf16 GEMM writes bf16 outputs only (no bf16 x bf16 -> float32 `mm` on CPU), and rounding the
# vocabulary projection's outputs to bf16 leaves logits 1/16 apart (issue 17): the vocabulary projection
# (`native.swaps.NativeVocabProjection`) opens this scope so `Model.logits` stays float32 at every length.
_float32_products = contextvars.ContextVar("float32_products", default=False)


@contextlib.contextmanager
def float32_products():
    """Products on the GEMM path inside this scope keep float32 activations, weights and outputs."""
    token = _float32_products.set(True)
    try:
        yield
    finally:
        _float32_products.reset(token)


_scratch = threading.local()


def use_gemv(rows: int) -> bool:
    """Whether a product of this many activation rows goes to `gemv` rather than decode + GEMM."""
    return rows <= (BF16_GEMM_MIN_ROWS - 1 if BF16_PREFILL else MAX_GEMV_ROWS)


def _chunk_buffer(dtype: torch.dtype, numel: int) -> torch.Tensor:
    """A per-thread decode buffer reused across calls: a fresh multi-MiB tensor per chunk costs a page fault
    per 4 KiB (measured: most of a Q4_0 8192 x 2048 product at 32 rows)."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.dtype != dtype or buf.numel() < numel:
        buf = _scratch.buf = torch.empty(max(numel, _CHUNK_ELEMENTS), dtype=dtype)
    return buf[:numel]


def linear(x: torch.Tensor, packed: torch.Tensor, type_id: int, n_cols: int) -> torch.Tensor:
    """F.linear(x, W) for a packed ggml W (N, row_bytes): native gemv for a few rows, else decode + GEMM."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n_cols)  # (M, K)
    M, N = x2.shape[0], packed.shape[0]
    if use_gemv(M):
        y = gemv(x2.float(), packed, type_id, n_cols)
    else:
        # Many rows (prefill): decode bounded chunks of weight rows once and hand them to torch's GEMM.
        dtype = torch.bfloat16 if BF16_PREFILL and not _float32_products.get() else torch.float32
        x2 = x2.to(dtype)
        step = max(1, _CHUNK_ELEMENTS // n_cols)
        y = torch.empty(M, N, dtype=dtype)
        for i in range(0, N, step):
            rows = packed[i : i + step]
            w = dequantize(rows, type_id, n_cols, dtype, out=_chunk_buffer(dtype, rows.shape[0] * n_cols))
            torch.mm(x2, w.t(), out=y[:, i : i + step])
    return y.reshape(*lead, N).to(x.dtype)
