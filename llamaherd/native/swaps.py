"""Post-load swaps onto the native CPU kernels: `apply(net)` substitutes native modules for the reference ones.

The model files (llamaherd/model/) hold only the reference math. `llamaherd.load` calls `apply` once on the
loaded network; it replaces, in place and keeping every Parameter object (so the state dict is unchanged):

    llama.RMSNorm, gemma3.GemmaRMSNorm, llama4.L2Norm   -> one native call per norm (native/ops.c)
    rope.Rotary, gemma3.RotaryHalves                    -> native rotary rows, both layouts
    llama.Attention, gemma3.Attention                   -> one token's attention step as one native call
    llama.VocabProjection (every family)                -> bf16 matrix-vector kernel with float32 logits,
                                                           float32 outputs for many-row products
    bf16 bias-free nn.Linear                            -> DenseLinear / DenseGroup (native/dense.py)
    llama.Transformer, gemma3.Transformer (the root)    -> the whole decode step as one native call (native/step.py;
                                                           packed GGUF, bf16 or weight-only int8/int4 projections),
                                                           class changed in place

Each native module is a subclass of the reference one whose `forward` takes the native path when it applies
(float32 or bf16 CPU tensors, no autograd, the library built and switched on) and calls the reference
`forward` otherwise. So the switches work at run time: under `llamaherd.native.disabled()` (or
`native.switched_off(ops)` for the glue alone) a swapped model computes exactly what the reference model
computes; a model loaded under them is not swapped at all. Packed GGUF weights are swapped before loading
(`quant.ggml.swap_ggml`), since their shapes differ from the reference modules'.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import native
from ..model import gemma3, llama, llama4, rope
from ..model.cache import KVCache
from . import dense, ggml_kernels, ops, step


class NativeRMSNorm(llama.RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if ops.usable(x, self.weight):  # one native call instead of ~8 aten ops
            return ops.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


class NativeGemmaRMSNorm(gemma3.GemmaRMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if ops.usable(x, self.weight):
            return ops.rms_norm(x, self.weight, self.eps, plus_one=True)
        return super().forward(x)


class NativeL2Norm(llama4.L2Norm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if ops.usable(x):
            return ops.rms_norm(x, None, self.eps)
        return super().forward(x)


class NativeRotary(rope.Rotary):
    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if ops.rope_applies(x, cos, sin):  # one native call instead of ~10 aten ops, at every length
            return ops.rope(x, cos, sin, layout=ops.PAIRS)
        return super().forward(x, cos, sin)


class NativeRotaryHalves(gemma3.RotaryHalves):
    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if ops.rope_applies(x, cos, sin):
            return ops.rope(x, cos, sin, layout=ops.HALVES)
        return super().forward(x, cos, sin)


def _decoding(x: torch.Tensor, cache: object) -> bool:
    """One float32 token per row on the CPU into a float32 `KVCache` (the paged cache has its own `update`).

    The cheap check before the projections; `ops.attend_decode_applies` checks the rest after them. When that
    one fails (autograd, unusual strides) the reference `forward` runs and projects again.
    """
    return x.shape[1] == 1 and x.dtype == torch.float32 and x.is_cpu and type(cache) is KVCache \
        and cache.k.dtype == torch.float32


def _one_token_qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The projections of one token per row, shaped (B, 1, heads, head_dim) as the native call takes them."""
    B = x.shape[0]
    return (attn.wq(x).view(B, 1, attn.n_heads, attn.head_dim), attn.wk(x).view(B, 1, attn.n_kv_heads, attn.head_dim),
            attn.wv(x).view(B, 1, attn.n_kv_heads, attn.head_dim))


class DecodeAttention(llama.Attention):
    """One token: rotary, cache write and attention as one native call; anything else: the reference."""

    def forward(self, x, cos, sin, mask, cache, layer: int, start: int) -> torch.Tensor:
        if _decoding(x, cache):
            q, k, v = _one_token_qkv(self, x)
            if ops.attend_decode_applies(q, k, v, cos, sin, cache.k, cache.v, start, mask):
                return self.wo(ops.attend_decode(q, k, v, cos, sin, cache.k, cache.v, layer, start, mask,
                                                 layout=ops.PAIRS))
        return super().forward(x, cos, sin, mask, cache, layer, start)


class GemmaDecodeAttention(gemma3.Attention):
    """One token: q/k norms, rotary, cache write and attention as one native call; anything else: the reference."""

    def forward(self, x, cos, sin, mask, cache, layer: int, start: int) -> torch.Tensor:
        if _decoding(x, cache):
            q, k, v = _one_token_qkv(self, x)
            qn, kn = self.q_norm, self.k_norm
            if ops.attend_decode_applies(q, k, v, cos, sin, cache.k, cache.v, start, mask, qn.weight, kn.weight):
                out = ops.attend_decode(q, k, v, cos, sin, cache.k, cache.v, layer, start, mask, layout=ops.HALVES,
                                        scale=self.scale, q_norm=(qn.weight, qn.eps), k_norm=(kn.weight, kn.eps),
                                        plus_one=True)
                return self.wo(out)
        return super().forward(x, cos, sin, mask, cache, layer, start)


# Weight rows per float32 chunk of a bf16 vocabulary matrix (bounds the scratch to 8 MiB, as ggml_kernels).
_CHUNK_ELEMENTS = 1 << 21


class NativeVocabProjection(llama.VocabProjection):
    """Float32 logits at every length.

    Few rows of a bf16 matrix: the native kernel writes the float32 sums directly (no bf16 rounding then
    widening). Many rows: torch's CPU bf16 GEMM can only write bf16, which would round the logits to 8 bits
    of mantissa (issue 17), so the product is taken in float32 over chunks of the matrix; packed GGUF matrices
    likewise (`ggml_kernels.float32_products`). The other products of a prefill keep the bf16 GEMM.
    """

    def forward(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if dense.applies(h, weight):
            return dense.gemv(h, weight, torch.float32)
        if weight.dtype == torch.bfloat16 and type(weight) in (torch.Tensor, nn.Parameter) and h.is_cpu \
                and weight.is_cpu and not torch.is_grad_enabled() and dense.available():
            return _float32_linear(h, weight)
        with ggml_kernels.float32_products():  # acts on packed ggml weights only
            return super().forward(h, weight)


def _float32_linear(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """h @ weight.T in float32 (bf16 values widened exactly), over bounded chunks of weight rows."""
    x = h.reshape(-1, h.shape[-1]).float()
    N, K = weight.shape
    y = torch.empty(x.shape[0], N, dtype=torch.float32)
    step = max(1, _CHUNK_ELEMENTS // max(K, 1))
    for i in range(0, N, step):
        torch.mm(x, weight[i : i + step].float().t(), out=y[:, i : i + step])
    return y.view(*h.shape[:-1], N)


# reference class -> native subclass; matched on the exact type (llama4.Attention has its own forward).
NATIVE: dict[type[nn.Module], type[nn.Module]] = {
    llama.RMSNorm: NativeRMSNorm,
    gemma3.GemmaRMSNorm: NativeGemmaRMSNorm,
    llama4.L2Norm: NativeL2Norm,
    rope.Rotary: NativeRotary,
    gemma3.RotaryHalves: NativeRotaryHalves,
    llama.Attention: DecodeAttention,
    gemma3.Attention: GemmaDecodeAttention,
    llama.VocabProjection: NativeVocabProjection,
}


def native_module(module: nn.Module) -> nn.Module:
    """The native counterpart of `module` holding its very attributes, parameters and children (nothing is
    copied), or `module` itself when it has none."""
    cls = NATIVE.get(type(module))
    if cls is None:
        return module
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    for registry in ("_parameters", "_buffers", "_modules"):
        setattr(new, registry, dict(getattr(module, registry)))
    return new


def _swap_children(parent: nn.Module) -> int:
    swapped = 0
    for name, child in list(parent.named_children()):
        swapped += _swap_children(child)  # children first: a swapped module takes its already swapped children
        new = native_module(child)
        if new is not child:
            setattr(parent, name, new)
            swapped += 1
    return swapped


def apply(net: nn.Module) -> int:
    """Swap a loaded CPU model's modules onto the native kernels (see the module docstring); return how many.

    Nothing is swapped when the library is unavailable (no compiler, or `native.disabled()`) or a parameter
    lives on another device.
    """
    if any(not t.is_cpu for t in (*net.parameters(), *net.buffers())) or native.library() is None:
        return 0
    return dense.swap_dense(net) + _swap_children(net) + step.apply(net, NATIVE)


__all__ = ["NATIVE", "apply", "native_module"]
