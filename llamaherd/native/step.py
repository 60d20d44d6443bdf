"""The whole decode step of a GGUF Llama or Gemma 3 model as one native call (llamaherd/native/step.c), as a swap.

Why: with the products on native kernels, a decode step still paid per layer a dozen Python module calls,
ctypes round trips, small torch ops and one OpenMP fork/join per product (bench/PROFILE.md section 12). Here
`lh_step_decode` runs every layer in one parallel region; Python keeps the embedding lookup, the final norm,
the vocabulary projection (one native product) and sampling.

`apply(net)` (called by `native.swaps.apply`, so by `llamaherd.load`) changes the class of a `llama.Transformer`
or `gemma3.Transformer` in place to a subclass whose `forward` takes the one-call step when it applies and is
the reference `forward` otherwise: nothing else of the model changes (same modules, parameters, state dict).
It applies to one new token per row (at most MAX_ROWS rows) on the simple float32 `KVCache`, outside autograd,
when every projection of every layer is a packed ggml weight the kernels take, the norms and rotary modules are
the reference ones or their native swaps, and the switches are on: `ENABLED` (`disabled()`), the fused glue
(`native.ops.ENABLED`) and the library (`native.disabled()`). `ggml_kernels.INT8_ACTIVATIONS` chooses int8 or
float activations here as for the single products. The paged cache of the serving engine takes the per-module
path.

The plan (the weights' pointers as C structures) is made at the first step and kept on the model; `forget(net)`
drops it, for whoever swaps modules or reassigns weights after that (`Module._apply`, i.e. `.to()` and the
like, drops it by itself).
"""

from __future__ import annotations

import ctypes
import sys
import weakref

import torch
from torch import nn

from .. import native
from ..model import gemma3, llama
from ..model.cache import KVCache
from . import ggml_kernels, ops

ENABLED = True  # module switch for the one-call step; the per-module native path stays on
MAX_ROWS = 16  # step.c's LH_STEP_MAX_ROWS

_SILU, _GELU_TANH = 0, 1  # step.c's activations


class _Weight(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int64), ("data", ctypes.c_void_p), ("rows", ctypes.c_int64),
                ("stride", ctypes.c_int64)]


_PROJECTIONS = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")
_NORMS = ("attn_norm", "ffn_norm", "post_attn_norm", "post_ffn_norm", "q_norm", "k_norm")


class _Layer(ctypes.Structure):
    _fields_ = [*((name, _Weight) for name in _PROJECTIONS), *((name, ctypes.c_void_p) for name in _NORMS),
                ("local", ctypes.c_int64)]


class _Model(ctypes.Structure):
    _fields_ = [*((name, ctypes.c_int64) for name in ("n_layers", "dim", "hidden", "n_heads", "n_kv_heads",
                                                       "head_dim", "norm_mode", "layout", "act", "window", "int8")),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("inv_freq", ctypes.c_void_p),
                ("inv_freq_local", ctypes.c_void_p), ("layers", ctypes.POINTER(_Layer))]


_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {
    "lh_step_check": [_ptr],
    "lh_step_decode": [_ptr, _ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _i64, _ptr, _i64, _int],
}


def _fn(name: str):
    return native.function(name, _SIGNATURES[name])


def disabled():
    """Run the enclosed code on the per-module path (the native kernels and glue stay on)."""
    return native.switched_off(sys.modules[__name__])


class _Plan:
    """A model's layers as step.c's structures, holding every tensor whose address they carry."""

    def __init__(self, model: _Model, layers, keep: list[torch.Tensor]) -> None:
        self.model, self.layers, self.keep = model, layers, keep
        self.ref = ctypes.byref(model)


def _packed(m: nn.Module) -> tuple[torch.Tensor, int] | None:
    """A packed ggml linear's (rows, row_bytes) uint8 bytes and type id (quant.ggml.GGMLLinear's interface:
    `qtype.id`, `in_features`, `weight.plain()`), or None for any other module (LoRA, float Linear)."""
    qtype, weight = getattr(m, "qtype", None), getattr(m, "weight", None)
    if qtype is None or not hasattr(weight, "plain") or m._forward_hooks or m._forward_pre_hooks:
        return None
    packed = weight.plain()
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.stride(1) != 1 or not packed.is_cpu:
        return None
    return packed, int(qtype.id)


def _float_vector(t: torch.Tensor | None, n: int) -> bool:
    return t is not None and t.dtype == torch.float32 and t.is_cpu and t.is_contiguous() and t.shape == (n,)


def _make_plan(net: nn.Module, int8: bool) -> _Plan | None:
    """The plan of `net` (a llama or gemma3 Transformer), or None when some part is not what step.c computes."""
    from .swaps import NATIVE  # the native subclasses count as the reference modules they replace

    def is_(module: nn.Module, ref: type) -> bool:
        return type(module) in (ref, NATIVE.get(ref)) and not module._forward_hooks and not module._forward_pre_hooks

    gemma = isinstance(net, gemma3.Transformer)
    fam = gemma3 if gemma else llama
    c = net.config
    rotary = gemma3.RotaryHalves if gemma else llama.Rotary
    keep: list[torch.Tensor] = []
    layers = (_Layer * len(net.layers))()
    eps = None
    for i, block in enumerate(net.layers):
        attn, ff = block.attention, block.feed_forward
        if type(block) is not fam.TransformerBlock or not is_(attn, fam.Attention) or type(ff) is not fam.FeedForward \
                or not is_(attn.rope, rotary):
            return None
        L = layers[i]
        for name, owner in (("wq", attn), ("wk", attn), ("wv", attn), ("wo", attn), ("w1", ff), ("w3", ff), ("w2", ff)):
            found = _packed(getattr(owner, name))
            if found is None:
                return None
            packed, type_id = found
            keep.append(packed)
            setattr(L, name, _Weight(type_id, packed.data_ptr(), packed.shape[0], packed.stride(0)))
        norms = {"attn_norm": (block.attention_norm, c.dim), "ffn_norm": (block.ffn_norm, c.dim)}
        if gemma:
            norms.update(post_attn_norm=(block.post_attention_norm, c.dim), post_ffn_norm=(block.post_ffn_norm, c.dim),
                         q_norm=(attn.q_norm, c.head_dim), k_norm=(attn.k_norm, c.head_dim))
        for name, (norm, n) in norms.items():
            if not is_(norm, gemma3.GemmaRMSNorm if gemma else llama.RMSNorm) or not _float_vector(norm.weight, n) \
                    or (eps is not None and norm.eps != eps):
                return None
            eps = norm.eps
            keep.append(norm.weight)
            setattr(L, name, norm.weight.data_ptr())
        L.local = int(gemma and not gemma3.is_global_layer(c, i))
    inv = net.freqs.on(torch.device("cpu")).float().contiguous()
    inv_local = net.local_freqs.on(torch.device("cpu")).float().contiguous() if gemma else inv
    keep += [inv, inv_local]
    attn = net.layers[0].attention
    model = _Model(
        n_layers=len(net.layers), dim=c.dim, hidden=net.layers[0].feed_forward.w1.out_features, n_heads=attn.n_heads,
        n_kv_heads=attn.n_kv_heads, head_dim=attn.head_dim, norm_mode=ops._ONE_PLUS_WEIGHT if gemma else ops._WEIGHT,
        layout=ops.HALVES if gemma else ops.PAIRS, act=_GELU_TANH if gemma else _SILU,
        window=(c.sliding_window or 0) if gemma else 0, int8=int(int8), eps=eps,
        scale=attn.scale if gemma else attn.head_dim**-0.5, inv_freq=inv.data_ptr(), inv_freq_local=inv_local.data_ptr(),
        layers=ctypes.cast(layers, ctypes.POINTER(_Layer)),
    )
    if _fn("lh_step_check")(ctypes.byref(model)) != 0:
        return None
    return _Plan(model, layers, keep)


# model -> {int8 activations: plan or None}; outside the model's own attributes so that copy.deepcopy and
# pickle of a model never meet the ctypes structures (a copy makes its own plan).
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plan(net: nn.Module) -> _Plan | None:
    int8 = bool(ggml_kernels.INT8_ACTIVATIONS)
    plans = _PLANS.setdefault(net, {})
    if int8 not in plans:
        plans[int8] = _make_plan(net, int8)
    return plans[int8]


def forget(net: nn.Module) -> None:
    """Drop the plan made at the first step (after swapping modules or reassigning weights)."""
    _PLANS.pop(net, None)


def _applies(tokens: torch.Tensor, positions, cache, key_mask) -> bool:
    """The cheap conditions of the one-call step (the module docstring lists them), before the plan."""
    if not ENABLED or not ops.ENABLED or torch.is_grad_enabled() or type(cache) is not KVCache:
        return False
    B, T = tokens.shape
    k = cache.k
    if T != 1 or not 1 <= B <= MAX_ROWS or k.dtype != torch.float32 or not k.is_cpu or not k.is_contiguous() \
            or not cache.v.is_contiguous() or cache.v.shape != k.shape or k.shape[1] != B \
            or cache.length >= cache.max_len:
        return False
    if positions is not None and (positions.shape != (B, 1) or not positions.is_cpu):
        return False
    if key_mask is not None and (key_mask.dtype != torch.bool or key_mask.shape != (B, cache.length + 1)
                                 or not key_mask.is_cpu):
        return False
    return native.library() is not None


def step(net: nn.Module, plan: _Plan, tokens: torch.Tensor, positions, cache: KVCache, key_mask) -> torch.Tensor | None:
    """The last layer's output (B, 1, dim) for one token per row, the cache written and advanced; None when the
    embedding is not float32 (the caller then takes the reference path, the cache untouched)."""
    B = tokens.shape[0]
    c = net.config
    h = net.tok_embeddings(tokens)
    if h.dtype != torch.float32:
        return None
    if isinstance(net, gemma3.Transformer):  # as gemma3.Transformer.forward: sqrt(dim) in the model dtype
        h = h * torch.tensor(c.dim**0.5, dtype=h.dtype)
    h = h.reshape(B, c.dim).contiguous()
    start = cache.length
    pos = torch.full((B,), start, dtype=torch.long) if positions is None else positions.reshape(B).to(torch.long).contiguous()
    mask = None if key_mask is None else key_mask.contiguous()
    rc = _fn("lh_step_decode")(plan.ref, h.data_ptr(), B, pos.data_ptr(), cache.k.data_ptr(), cache.v.data_ptr(),
                               cache.k.stride(0), cache.max_len, start, None if mask is None else mask.data_ptr(),
                               0 if mask is None else mask.stride(0), torch.get_num_threads())
    if rc == -2:
        raise MemoryError("the native decode step could not allocate its scratch")
    if rc != 0:
        raise ValueError(f"lh_step_decode refused its arguments (rc {rc})")
    cache.length = start + 1
    return h.view(B, 1, c.dim)


class _Step:
    """The forward of a swapped model: the one-call step when it applies, else the reference forward."""

    def forward(self, tokens, positions=None, cache=None, key_mask=None, last_only=False):
        if _applies(tokens, positions, cache, key_mask):
            plan = _plan(self)
            h = None if plan is None else step(self, plan, tokens, positions, cache, key_mask)
            if h is not None:
                logits = self.project(self.norm(h), self.output_weight())
                cap = getattr(self.config, "final_logit_softcap", None)
                if isinstance(self, gemma3.Transformer) and cap is not None:
                    logits = gemma3.softcap(logits, cap)
                return logits
        return super().forward(tokens, positions, cache, key_mask, last_only)

    def _apply(self, fn, recurse=True):
        forget(self)  # weights may move: the plan's addresses would be stale
        return super()._apply(fn, recurse)


class StepLlama(_Step, llama.Transformer):
    """llama.Transformer with the one-call decode step."""


class StepGemma3(_Step, gemma3.Transformer):
    """gemma3.Transformer with the one-call decode step."""


_SWAPS = {llama.Transformer: StepLlama, gemma3.Transformer: StepGemma3}


def apply(net: nn.Module) -> int:
    """Give a loaded llama or gemma3 Transformer the one-call decode step (in place); 1 if it was, else 0."""
    cls = _SWAPS.get(type(net))
    if cls is None or native.library() is None:
        return 0
    net.__class__ = cls
    return 1


__all__ = ["ENABLED", "MAX_ROWS", "StepGemma3", "StepLlama", "apply", "disabled", "forget", "step"]
