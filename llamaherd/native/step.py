"""The whole decode step of a Llama or Gemma 3 model as one native call (llamaherd/native/step.c), as a swap.

Why: with the products on native kernels, a decode step still paid per layer a dozen Python module calls,
ctypes round trips, small torch ops and one OpenMP fork/join per product (bench/PROFILE.md section 12). Here
`lh_step_decode` runs every layer in one parallel region; Python keeps the embedding lookup, the final norm,
the vocabulary projection (one native product) and sampling.

`apply(net)` (called by `native.swaps.apply`, so by `llamaherd.load`) changes the class of a `llama.Transformer`
or `gemma3.Transformer` in place to a subclass whose `forward` takes the one-call step when it applies and is
the reference `forward` otherwise: nothing else of the model changes (same modules, parameters, state dict).
It applies to one new token per row on the simple `KVCache` of `generate` or on the serving engine's paged
cache (a `slot_table`: engine/paged.py's BatchView; float32 or bf16 either), MAX_ROWS rows per call, outside
autograd, when the norms and rotary modules are the reference ones or their native swaps, the
switches are on (`ENABLED` / `disabled()`, the fused glue `native.ops.ENABLED`, the library
`native.disabled()`), and every projection of every layer is of one of these kinds, all layers alike:

  - packed ggml weights (GGUF models, quant/ggml.py): `ggml_kernels.INT8_ACTIVATIONS` chooses int8 or float
    activations here as for the single products;
  - bf16 matrices (a bf16 checkpoint's bias-free Linears, native/dense.py): dense.c's kernel on the activation
    rows rounded to bf16, float32 sums, as `DenseLinear` multiplies;
  - weight-only int8 / int4 / grouped 8-bit codes (quant/weight_only.py, quant/hf_quantized.py without
    act-order or bias): weight_only.c's kernels with the activation preparation of the per-module call
    (`native.weight_only.activation_mode()`: its INT16_ACTIVATIONS / INT8_ACTIVATIONS switches), off when those
    kernels are (`native.weight_only.ENABLED`).

A model mixing kinds (a projection left in bf16 beside int4 ones, GGUF beside weight-only), float32 matrices,
LoRA wrappers and patched `forward`s take the per-module path, as do a speculative step's several tokens per
row and the prefill chunks.

Precision of bf16 models: the reference and the per-module path keep the residual stream in bf16, rounding
every layer's output; the step keeps it in float32 (the embedding row widened exactly, norms, rotary,
attention and residual adds in float32, each product's input rounded to bf16 only where the bf16 kernel
takes bf16), so it is at least as close to a float32 computation on the same weights (the tests check this
against the float32 reference). The KV cache stays the engine's: bf16 for a bf16 model, each new key and
value rounded to bf16 as the reference's cache write rounds them. The last hidden state goes back to the
model's dtype before the final norm and vocabulary projection, which are the reference path's.

The plan (the weights' pointers as C structures) is made at the first step and kept for the model; every step
checks that the modules and weights it was made from are still in place, carry no hooks (tensor-parallel
all-reduce hooks, calibration hooks) and, for bf16 norm weights read through float32 copies, were not written
in place; else the plan is remade or the reference path taken. `Module._apply` (`.to()` and the like, which
may move weights without replacing them) drops the plan; `forget(net)` does too.
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
from . import dense, ggml_kernels, ops
from . import weight_only as native_wo

ENABLED = True  # module switch for the one-call step; the per-module native path stays on
MAX_ROWS = 16  # step.c's LH_STEP_MAX_ROWS

_SILU, _GELU_TANH = 0, 1  # step.c's activations


class _Weight(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int64), ("data", ctypes.c_void_p), ("rows", ctypes.c_int64),
                ("stride", ctypes.c_int64), ("scales", ctypes.c_void_p), ("zeros", ctypes.c_void_p),
                ("group", ctypes.c_int64), ("sz_f32", ctypes.c_int64)]


# step.c's weight kinds besides the ggml type ids
_BF16, _WO_INT8, _WO_INT4, _WO_GROUPED8 = 1000, 1001, 1002, 1003


_PROJECTIONS = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")
_NORMS = ("attn_norm", "ffn_norm", "post_attn_norm", "post_ffn_norm", "q_norm", "k_norm")


class _Layer(ctypes.Structure):
    _fields_ = [*((name, _Weight) for name in _PROJECTIONS), *((name, ctypes.c_void_p) for name in _NORMS),
                ("local", ctypes.c_int64)]


class _Model(ctypes.Structure):
    _fields_ = [*((name, ctypes.c_int64) for name in ("n_layers", "dim", "hidden", "n_heads", "n_kv_heads",
                                                       "head_dim", "norm_mode", "layout", "act", "window", "int8",
                                                       "act16")),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("inv_freq", ctypes.c_void_p),
                ("inv_freq_local", ctypes.c_void_p), ("layers", ctypes.POINTER(_Layer))]


class _Cache(ctypes.Structure):
    """step.c's lh_step_cache: where the keys and values of a step's rows live (its comment has the layouts)."""

    _fields_ = [("k", ctypes.c_void_p), ("v", ctypes.c_void_p),
                *((name, ctypes.c_int64) for name in ("bf16", "layer_stride", "row_stride", "head_stride", "n_slots",
                                                       "slot")),
                ("slots", ctypes.c_void_p), ("slots_stride", ctypes.c_int64), ("key_mask", ctypes.c_void_p),
                ("key_mask_stride", ctypes.c_int64)]


_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {
    "lh_step_check": [_ptr],
    "lh_step_decode": [_ptr, _ptr, _i64, _ptr, _ptr, _int],
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
        self.widened: list[tuple[torch.Tensor, int | None]] = []  # (bf16 weight read as a float32 copy, version)
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
        return all(map(operator.is_, map(dict.get, registries, names), objs)) and not any(map(len, hooks)) \
            and all(_version(t) == v for t, v in self.widened)

    def state(self) -> tuple:
        """What the checks of `intact` read, as it is now: a plan that failed is remade when this changes."""
        registries, names, _, hooks = self._lists()
        return (tuple(map(id, map(dict.get, registries, names))), tuple(map(len, hooks)),
                bool(_hooks._global_forward_hooks or _hooks._global_forward_pre_hooks),
                tuple(_version(t) for t, _ in self.widened))

    def refused(self) -> _Plan:
        """Mark the plan as not applying to the model as it is (`state` kept to notice a change)."""
        self.model, self.failed_state = None, self.state()
        return self


def _version(t: torch.Tensor) -> int | None:
    """The tensor's in-place write counter (inference tensors keep none)."""
    return None if t.is_inference() else t._version


def _weight(plan: _Plan, owner: nn.Module, name: str, N: int, K: int) -> _Weight | None:
    """Projection `name` of `owner` ((N, K) by its reference) as step.c's weight, or None for a module the step
    does not compute (LoRA, float32, a patched forward...)."""
    m = plan.child(owner, name)
    if m._modules or "forward" in m.__dict__:
        return None
    if getattr(m, "qtype", None) is not None:
        return _packed(plan, m)
    if type(m) in (nn.Linear, dense.DenseLinear):
        return _bf16(plan, m, N, K)
    return _weight_only(plan, m, N, K)


def _packed(plan: _Plan, m: nn.Module) -> _Weight | None:
    """A packed ggml linear (quant.ggml.GGMLLinear's interface: `qtype.id`, a `weight` buffer whose `plain()` is
    the (rows, row_bytes) uint8 bytes)."""
    if not hasattr(m._buffers.get("weight"), "plain"):
        return None
    packed = plan.tensor(m, "weight").plain()
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.stride(1) != 1 or not packed.is_cpu:
        return None
    return _Weight(int(m.qtype.id), packed.data_ptr(), packed.shape[0], packed.stride(0))


def _bf16(plan: _Plan, m: nn.Module, N: int, K: int) -> _Weight | None:
    """A bias-free bf16 Linear as native/dense.py computes it (`dense.applies`: a plain 2-D tensor, unit stride
    along K)."""
    if m.bias is not None:
        return None
    w = plan.tensor(m, "weight")
    if type(w) not in (torch.Tensor, nn.Parameter) or w.dtype != torch.bfloat16 or not w.is_cpu \
            or w.shape != (N, K) or w.stride(1) != 1:
        return None
    return _Weight(_BF16, w.data_ptr(), N, 2 * w.stride(0))


def _weight_only(plan: _Plan, m: nn.Module, N: int, K: int) -> _Weight | None:
    """Weight-only codes in the layouts native/weight_only.py's `Codes` takes (quant.weight_only.Int8Linear /
    Int4Linear, quant.hf_quantized.PackedLinear without act-order or bias): exactly the tensors `qweight`,
    `scales` and for grouped codes `zeros` with an int `group_size`; any other tensor (a bias, a permutation)
    means other math."""
    held = {n for r in (m._parameters, m._buffers) for n, t in r.items() if t is not None}
    if not {"qweight", "scales"} <= held <= {"qweight", "scales", "zeros"}:
        return None
    q, s = plan.tensor(m, "qweight"), plan.tensor(m, "scales")
    if not (q.is_cpu and s.is_cpu and q.is_contiguous() and s.is_contiguous() and q.dim() == 2 and q.shape[0] == N):
        return None
    if held == {"qweight", "scales"}:
        ok = q.dtype == torch.int8 and q.shape[1] == K and s.dtype == torch.bfloat16 and s.shape == (N,)
        return _Weight(_WO_INT8, q.data_ptr(), N, K, s.data_ptr(), None, 0, 0) if ok else None
    z, G = plan.tensor(m, "zeros"), getattr(m, "group_size", None)
    if q.dtype != torch.uint8 or type(G) is not int or G < 1 or K % G or q.shape[1] not in (K, K // 2) \
            or not (z.is_cpu and z.is_contiguous()) or s.dtype != z.dtype or s.shape != (K // G, N) \
            or z.shape != s.shape or s.dtype not in (torch.bfloat16, torch.float32):
        return None
    kind = _WO_INT4 if 2 * q.shape[1] == K else _WO_GROUPED8
    return _Weight(kind, q.data_ptr(), N, q.stride(0), s.data_ptr(), z.data_ptr(), G, int(s.dtype == torch.float32))


def _norm_weight(plan: _Plan, norm: nn.Module, n: int) -> torch.Tensor | None:
    """A norm's (n,) weight as step.c reads it: float32 in place, or a bf16 model's widened (exactly) to a float32
    copy whose source `intact` watches for in-place writes."""
    w = plan.tensor(norm, "weight")
    if not (w.is_cpu and w.is_contiguous() and w.shape == (n,)) or w.dtype not in (torch.float32, torch.bfloat16):
        return None
    if w.dtype == torch.bfloat16:
        plan.widened.append((w, _version(w)))
        w = w.float()
        plan.keep.append(w)
    return w


def _make_plan(net: nn.Module, int8: bool, act16: int) -> _Plan:
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
    hidden = _hidden(net)
    blocks = plan.child(net, "layers")
    for i in range(len(blocks)):
        block = plan.child(blocks, str(i))
        attn, ff = plan.child(block, "attention"), plan.child(block, "feed_forward")
        rotary = plan.child(attn, "rope")
        if not (type(block) is fam.TransformerBlock and type(ff) is fam.FeedForward and is_(attn, fam.Attention)
                and is_(rotary, gemma3.RotaryHalves if gemma else llama.Rotary)):
            return plan.refused()
        L = layers[i]
        QD, KD, F = attn.n_heads * attn.head_dim, attn.n_kv_heads * attn.head_dim, hidden
        for name, owner, N, K in (("wq", attn, QD, c.dim), ("wk", attn, KD, c.dim), ("wv", attn, KD, c.dim),
                                  ("wo", attn, c.dim, QD), ("w1", ff, F, c.dim), ("w3", ff, F, c.dim),
                                  ("w2", ff, c.dim, F)):
            weight = _weight(plan, owner, name, N, K)
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
            weight = _norm_weight(plan, norm, n)
            if weight is None:
                return plan.refused()
            eps = norm.eps
            setattr(L, field, weight.data_ptr())
        L.local = int(gemma and not gemma3.is_global_layer(c, i))
    inv = net.freqs.on(torch.device("cpu")).float().contiguous()
    inv_local = net.local_freqs.on(torch.device("cpu")).float().contiguous() if gemma else inv
    plan.keep += [inv, inv_local, layers]
    attn = net.layers[0].attention
    plan.model = _Model(
        n_layers=len(net.layers), dim=c.dim, hidden=hidden, n_heads=attn.n_heads,
        n_kv_heads=attn.n_kv_heads, head_dim=attn.head_dim, norm_mode=ops._ONE_PLUS_WEIGHT if gemma else ops._WEIGHT,
        layout=ops.HALVES if gemma else ops.PAIRS, act=_GELU_TANH if gemma else _SILU,
        window=(c.sliding_window or 0) if gemma else 0, int8=int(int8), act16=int(act16), eps=eps,
        scale=attn.scale if gemma else attn.head_dim**-0.5, inv_freq=inv.data_ptr(),
        inv_freq_local=inv_local.data_ptr(),
        layers=ctypes.cast(layers, ctypes.POINTER(_Layer)),
    )
    if not plan.intact() or _fn("lh_step_check")(ctypes.byref(plan.model)) != 0:  # intact: no hooks anywhere
        return plan.refused()
    if layers[0].wq.type > _BF16 and not native_wo.available():  # weight-only kernels switched off: torch's run
        return plan.refused()
    plan.ref = ctypes.byref(plan.model)
    return plan


def _hidden(net: nn.Module) -> int:
    """The feed-forward width (every projection module kind here has `out_features`)."""
    w1 = net.layers[0].feed_forward.w1
    return int(getattr(w1, "out_features", 0) or 0)


# model -> {(int8 activations, weight-only activation kind, weight-only kernels on): plan}; outside the model's own attributes so that copy.deepcopy and
# pickle of a model never meet the ctypes structures (a copy makes its own plan).
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plan(net: nn.Module) -> _Plan | None:
    """The model's plan for the current activation kind, made on first use and remade when a module or weight
    it was made from has changed; None when the step does not apply to the model as it is now."""
    switches = (bool(ggml_kernels.INT8_ACTIVATIONS), native_wo.activation_mode(), native_wo.ENABLED)
    plans = _PLANS.setdefault(net, {})
    plan = plans.get(switches)
    if plan is None or (plan.model is not None and not plan.intact()) \
            or (plan.model is None and plan.state() != plan.failed_state):
        plan = plans[switches] = _make_plan(net, *switches[:2])
    return plan if plan.model is not None else None


def forget(net: nn.Module) -> None:
    """Drop the model's plans (remade at the next step)."""
    _PLANS.pop(net, None)


def _applies(tokens: torch.Tensor, positions, cache, key_mask) -> bool:
    """The cheap conditions of the one-call step (the module docstring lists them), before the plan."""
    if not ENABLED or not ops.ENABLED or torch.is_grad_enabled():
        return False
    B, T = tokens.shape
    if type(cache) is KVCache:
        k, v = cache.k, cache.v
        if k.shape[1] != B or cache.length >= cache.max_len:
            return False
    elif callable(getattr(cache, "slot_table", None)):  # the serving engine's paged cache (engine/paged.py)
        k, v = cache.cache.k, cache.cache.v
    else:
        return False
    if T != 1 or k.dtype not in _CACHE_DTYPES or not k.is_cpu or not k.is_contiguous() or not v.is_contiguous() \
            or v.shape != k.shape or v.dtype != k.dtype:
        return False
    if positions is not None and (positions.shape != (B, 1) or not positions.is_cpu):
        return False
    if key_mask is not None and (key_mask.dtype != torch.bool or key_mask.shape != (B, cache.length + 1)
                                 or not key_mask.is_cpu):
        return False
    return native.library() is not None


_CACHE_DTYPES = (torch.float32, torch.bfloat16)


def _cache_rows(cache, key_mask: torch.Tensor | None):
    """step.c's view of the cache (`_Cache`) for the step's rows from b0 on, as `rows(b0)`: the simple
    `KVCache` ((n_layers, B, n_kv_heads, max_len, head_dim), one shared slot column) or the paged cache's
    `slot_table` (each row's slot ids). The returned function holds the tensors whose addresses it hands out."""
    S = cache.length
    if type(cache) is KVCache:
        k, v, slots, n_slots, row_stride, head_stride = cache.k, cache.v, None, cache.max_len, cache.k.stride(1), \
            cache.k.stride(2)
    else:
        k, v, slots = cache.slot_table()  # (n_layers, n_kv_heads, slots, head_dim) twice, (B, S + 1) slot ids
        slots = slots.to(torch.long).contiguous()
        if slots.dim() != 2 or slots.shape[1] != S + 1:
            raise ValueError(f"the paged cache's slot table is {tuple(slots.shape)}, not (B, {S + 1})")
        n_slots, row_stride, head_stride = k.shape[2], 0, k.stride(1)
    esz = k.element_size()

    def rows(b0: int) -> _Cache:
        return _Cache(k=k.data_ptr() + b0 * row_stride * esz, v=v.data_ptr() + b0 * row_stride * esz,
                      bf16=int(k.dtype == torch.bfloat16), layer_stride=k.stride(0), row_stride=row_stride,
                      head_stride=head_stride, n_slots=n_slots, slot=S,
                      slots=None if slots is None else slots[b0].data_ptr(), slots_stride=S + 1,
                      key_mask=None if key_mask is None else key_mask[b0].data_ptr(),
                      key_mask_stride=0 if key_mask is None else key_mask.stride(0))

    return rows


def step(net: nn.Module, plan: _Plan, tokens: torch.Tensor, positions, cache, key_mask) -> torch.Tensor | None:
    """The last layer's output (B, 1, dim) in the embedding's dtype for one token per row, the cache written (a
    simple `KVCache` advanced); None when the embedding is not float32 or bf16 (the caller then takes the
    reference path, the cache untouched). More than MAX_ROWS rows go through step.c MAX_ROWS at a time."""
    B = tokens.shape[0]
    c = net.config
    e = net.tok_embeddings(tokens)
    if e.dtype not in (torch.float32, torch.bfloat16):
        return None
    if isinstance(net, gemma3.Transformer):  # as gemma3.Transformer.forward: sqrt(dim) in the model dtype
        e = e * torch.tensor(c.dim**0.5, dtype=e.dtype)
    h = e.reshape(B, c.dim).float().contiguous()  # a copy for bf16: the step computes in float32
    start = cache.length
    if positions is None:
        pos = torch.full((B,), start, dtype=torch.long)
    else:
        pos = positions.reshape(B).to(torch.long).contiguous()
    rows = _cache_rows(cache, None if key_mask is None else key_mask.contiguous())
    for b0 in range(0, B, MAX_ROWS):
        n = min(MAX_ROWS, B - b0)
        rc = _fn("lh_step_decode")(plan.ref, h[b0].data_ptr(), n, pos[b0].data_ptr(), ctypes.byref(rows(b0)),
                                   torch.get_num_threads())
        if rc == -2:
            raise MemoryError("the native decode step could not allocate its scratch")
        if rc != 0:
            raise ValueError(f"lh_step_decode refused its arguments (rc {rc})")
    if type(cache) is KVCache:
        cache.length = start + 1
    return h.view(B, 1, c.dim).to(e.dtype)


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
