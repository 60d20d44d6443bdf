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

The plan (the weights' pointers as C structures) is made at the first step and kept for the model; every step
checks that the modules and weights it was made from are still in place and carry no hooks (tensor-parallel
all-reduce hooks, calibration hooks), else the plan is remade or the reference path taken. `Module._apply`
(`.to()` and the like, which may move weights without replacing them) drops the plan; `forget(net)` does too.
"""

from __future__ import annotations

import ctypes
import operator
import sys
import weakref
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.modules import module as _hooks

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
    """A model's layers as step.c's structures, holding every tensor whose address they carry, and what the plan
    was made from: each module and weight with the registry it was found in (`intact` checks them)."""

    def __init__(self) -> None:
        self.keep: list[torch.Tensor] = []
        self.found: list[tuple[dict, str, object]] = []  # (parent's _modules / _parameters / _buffers, name, object)
        self.modules: list[nn.Module] = []
        self.model: _Model | None = None
        self.ref = None
        self._lookup: tuple | None = None
        self.failed_state: tuple | None = None

    def child(self, parent: nn.Module, name: str) -> nn.Module:
        module = parent._modules[name]
        self.found.append((parent._modules, name, module))
        self.modules.append(module)
        self._lookup = None
        return module

    def tensor(self, module: nn.Module, name: str) -> torch.Tensor:
        registry = module._parameters if name in module._parameters else module._buffers
        t = registry[name]
        self.found.append((registry, name, t))
        self.keep.append(t)
        self._lookup = None
        return t

    def _lists(self) -> tuple:
        if self._lookup is None:  # `found` and the hook dicts as parallel tuples, for iteration in C (map)
            registries, names, objs = zip(*self.found) if self.found else ((), (), ())
            hooks = [d for m in self.modules for d in (m._forward_hooks, m._forward_pre_hooks)]
            self._lookup = (registries, names, objs, hooks)
        return self._lookup

    def intact(self) -> bool:
        """Whether every module and weight is still the one planned for, with no hook on any (a module swapped
        or a weight reassigned since, or hooks added, send the step to the reference path). A few microseconds
        for Gemma 3 270M's ~850 checks."""
        if _hooks._global_forward_hooks or _hooks._global_forward_pre_hooks:
            return False
        registries, names, objs, hooks = self._lists()
        return all(map(operator.is_, map(dict.get, registries, names), objs)) and not any(map(len, hooks))

    def state(self) -> tuple:
        """What the checks of `intact` read, as it is now: a plan that failed is remade when this changes."""
        registries, names, _, hooks = self._lists()
        return (tuple(map(id, map(dict.get, registries, names))), tuple(map(len, hooks)),
                bool(_hooks._global_forward_hooks or _hooks._global_forward_pre_hooks))

    def refused(self) -> _Plan:
        """Mark the plan as not applying to the model as it is (`state` kept to notice a change)."""
        self.model, self.failed_state = None, self.state()
        return self


def _packed(plan: _Plan, owner: nn.Module, name: str) -> _Weight | None:
    """A packed ggml linear as step.c's weight (quant.ggml.GGMLLinear's interface: `qtype.id`, a `weight`
    buffer whose `plain()` is the (rows, row_bytes) uint8 bytes), or None for any other module (LoRA, float)."""
    m = plan.child(owner, name)
    qtype = getattr(m, "qtype", None)
    if qtype is None or not hasattr(m._buffers.get("weight"), "plain"):
        return None
    packed = plan.tensor(m, "weight").plain()
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.stride(1) != 1 or not packed.is_cpu:
        return None
    return _Weight(int(qtype.id), packed.data_ptr(), packed.shape[0], packed.stride(0))


def _float_vector(t: torch.Tensor, n: int) -> bool:
    return t.dtype == torch.float32 and t.is_cpu and t.is_contiguous() and t.shape == (n,)


def _make_plan(net: nn.Module, int8: bool) -> _Plan:
    """The plan of `net` (a llama or gemma3 Transformer); `refused` when some part is not what step.c computes."""
    plan = _Plan()

    def is_(module: nn.Module, *refs: type) -> bool:  # a native subclass counts as the reference it replaces
        return any(type(module) in (ref, _NATIVE_OF.get(ref)) for ref in refs)

    gemma = isinstance(net, gemma3.Transformer)
    fam = gemma3 if gemma else llama
    c = net.config
    norm_type = gemma3.GemmaRMSNorm if gemma else llama.RMSNorm
    layers = (_Layer * len(net.layers))()
    eps = None
    blocks = plan.child(net, "layers")
    for i in range(len(blocks)):
        block = plan.child(blocks, str(i))
        attn, ff = plan.child(block, "attention"), plan.child(block, "feed_forward")
        rotary = plan.child(attn, "rope")
        if not (type(block) is fam.TransformerBlock and type(ff) is fam.FeedForward and is_(attn, fam.Attention)
                and is_(rotary, gemma3.RotaryHalves if gemma else llama.Rotary)):
            return plan.refused()
        L = layers[i]
        for name, owner in (("wq", attn), ("wk", attn), ("wv", attn), ("wo", attn), ("w1", ff), ("w3", ff), ("w2", ff)):
            weight = _packed(plan, owner, name)
            if weight is None:
                return plan.refused()
            setattr(L, name, weight)
        norms = {"attn_norm": (block, "attention_norm", c.dim), "ffn_norm": (block, "ffn_norm", c.dim)}
        if gemma:
            norms.update(post_attn_norm=(block, "post_attention_norm", c.dim),
                         post_ffn_norm=(block, "post_ffn_norm", c.dim),
                         q_norm=(attn, "q_norm", c.head_dim), k_norm=(attn, "k_norm", c.head_dim))
        for field, (owner, name, n) in norms.items():
            norm = plan.child(owner, name)
            if not is_(norm, norm_type) or (eps is not None and norm.eps != eps):
                return plan.refused()
            weight = plan.tensor(norm, "weight")
            if not _float_vector(weight, n):
                return plan.refused()
            eps = norm.eps
            setattr(L, field, weight.data_ptr())
        L.local = int(gemma and not gemma3.is_global_layer(c, i))
    inv = net.freqs.on(torch.device("cpu")).float().contiguous()
    inv_local = net.local_freqs.on(torch.device("cpu")).float().contiguous() if gemma else inv
    plan.keep += [inv, inv_local, layers]
    attn = net.layers[0].attention
    plan.model = _Model(
        n_layers=len(net.layers), dim=c.dim, hidden=net.layers[0].feed_forward.w1.out_features, n_heads=attn.n_heads,
        n_kv_heads=attn.n_kv_heads, head_dim=attn.head_dim, norm_mode=ops._ONE_PLUS_WEIGHT if gemma else ops._WEIGHT,
        layout=ops.HALVES if gemma else ops.PAIRS, act=_GELU_TANH if gemma else _SILU,
        window=(c.sliding_window or 0) if gemma else 0, int8=int(int8), eps=eps,
        scale=attn.scale if gemma else attn.head_dim**-0.5, inv_freq=inv.data_ptr(),
        inv_freq_local=inv_local.data_ptr(),
        layers=ctypes.cast(layers, ctypes.POINTER(_Layer)),
    )
    if not plan.intact() or _fn("lh_step_check")(ctypes.byref(plan.model)) != 0:  # intact: no hooks anywhere
        return plan.refused()
    plan.ref = ctypes.byref(plan.model)
    return plan


# model -> {int8 activations: plan or None}; outside the model's own attributes so that copy.deepcopy and
# pickle of a model never meet the ctypes structures (a copy makes its own plan).
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plan(net: nn.Module) -> _Plan | None:
    """The model's plan for the current activation kind, made on first use and remade when a module or weight
    it was made from has changed; None when the step does not apply to the model as it is now."""
    int8 = bool(ggml_kernels.INT8_ACTIVATIONS)
    plans = _PLANS.setdefault(net, {})
    plan = plans.get(int8)
    if plan is None or (plan.model is not None and not plan.intact()) \
            or (plan.model is None and plan.state() != plan.failed_state):
        plan = plans[int8] = _make_plan(net, int8)
    return plan if plan.model is not None else None


def forget(net: nn.Module) -> None:
    """Drop the model's plans (remade at the next step)."""
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
    if positions is None:
        pos = torch.full((B,), start, dtype=torch.long)
    else:
        pos = positions.reshape(B).to(torch.long).contiguous()
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


# reference class -> its native subclass, as native/swaps.py's NATIVE table hands it over in `apply` (matched on the
# exact type, so that a module with other math never passes for the reference).
_NATIVE_OF: dict[type[nn.Module], type[nn.Module]] = {}


def apply(net: nn.Module, native_of: Mapping[type[nn.Module], type[nn.Module]] | None = None) -> int:
    """Give a loaded llama or gemma3 Transformer the one-call decode step (in place); 1 if it was, else 0.
    `native_of` names the native subclasses the swaps put in place of reference modules."""
    _NATIVE_OF.update(native_of or {})
    cls = _SWAPS.get(type(net))
    if cls is None or native.library() is None:
        return 0
    net.__class__ = cls
    return 1


__all__ = ["ENABLED", "MAX_ROWS", "StepGemma3", "StepLlama", "apply", "disabled", "forget", "step"]
