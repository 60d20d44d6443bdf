"""LoRA as a swap over the built model: frozen base linears (float, int8/int4 weight-only or packed GGUF) plus
trainable low-rank updates.

y = base(x) + (alpha / r) * B(A(dropout(x)))   (Hu et al. 2021, "LoRA"; PEFT `tuners/lora/layer.py::Linear`),
with A initialised as PEFT does (kaiming-uniform, a = sqrt(5)) and B at zero, so a fresh adapter is the identity.

A packed GGUF base (`quant.GGMLLinear`, QLoRA over the file's own k-quant weights) is multiplied through
`_PackedMatmul`: its blocks are decoded chunk by chunk in forward and again in backward, so neither a float copy
of the weight nor its decoded chunks outlive the product. A weight-only int8/int4 base (`quant.weight_only`) runs
its own kernel forward; its backward multiplies by the dequantised matrix, made for that product only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TrainingError
from ..quant import weight_only
from ..quant.ggml import GGMLLinear, GGMLWeight

# Canonical (Meta) projection names, and the Hugging Face names people also write in --target.
HF_MODULE_NAMES = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo",
                   "gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
ALL_LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
DEFAULT_TARGETS = ("wq", "wk", "wv", "wo")

# Rows of a packed weight decoded at once: ~1 MiB of float32 scratch (the figure quant/ggml.py uses).
_CHUNK_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    layers: tuple[int, ...] | None = None  # None: every layer

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise TrainingError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not 0 <= self.dropout < 1:
            raise TrainingError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        targets = tuple(HF_MODULE_NAMES.get(t, t) for t in self.targets)
        unknown = sorted(set(targets) - set(ALL_LINEARS))
        if unknown:
            raise TrainingError(f"unknown LoRA target modules {unknown}; choose from {', '.join(ALL_LINEARS)} "
                                f"(or the HF names {', '.join(HF_MODULE_NAMES)})")
        object.__setattr__(self, "targets", targets)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def decoded_chunks(w: GGMLWeight, dtype: torch.dtype):
    """(first row, decoded rows) in chunks of ~1 MiB; the native decoder when built (bit-identical to the torch
    one), writing every chunk into one scratch buffer: use a chunk before asking for the next."""
    from ..native import ggml_kernels

    step = max(1, _CHUNK_ELEMENTS // w.n_cols)
    native = w.device.type == "cpu" and ggml_kernels.available(w.qtype.id)
    packed = w.plain()
    # Native: every chunk is decoded into one scratch buffer (a chunk is used up before the next is asked for).
    decoded = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
    scratch = torch.empty(min(step, w.shape[0]) * w.n_cols, dtype=decoded) if native else None
    for i in range(0, w.shape[0], step):
        if native:
            rows = packed[i : i + step]
            out = scratch[: rows.shape[0] * w.n_cols]
            yield i, ggml_kernels.dequantize(rows, w.qtype.id, w.n_cols, decoded, out=out).to(dtype)
        else:
            yield i, w[i : i + step].dequantize(dtype)


class _PackedMatmul(torch.autograd.Function):
    """x @ W.T for a frozen packed ggml W, decoding W's rows chunk by chunk in forward and in backward."""

    # The products go into one preallocated result and the chunks into one scratch buffer: keeping every chunk's
    # product until a final cat (or a new sum per chunk) interleaved small live blocks with freed 1 MiB chunks,
    # and the heap grew by ~1 MiB per chunk (+860 MiB RSS in the forward of Gemma 3's 262K-row vocabulary matrix).

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: GGMLWeight) -> torch.Tensor:
        ctx.w = w
        y = x.new_empty(*x.shape[:-1], w.shape[0])  # (..., out)
        for i, chunk in decoded_chunks(w, x.dtype):
            y[..., i : i + chunk.shape[0]] = F.linear(x, chunk)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w: GGMLWeight = ctx.w
        gx = grad.new_zeros(*grad.shape[:-1], w.n_cols)  # (..., in)
        for i, chunk in decoded_chunks(w, grad.dtype):
            gx += grad[..., i : i + chunk.shape[0]] @ chunk
        return gx, None


class _WeightOnlyMatmul(torch.autograd.Function):
    """x @ W.T for a frozen int8/int4 weight-only base: its kernel forward, the dequantised W in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        ctx.base = base
        return type(base).forward(base, x)  # the class's kernel forward, even where the training swap patched it

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ weight_only.dequantize(ctx.base).to(grad.dtype), None


def base_forward(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The frozen base projection; packed GGUF and weight-only int8/int4 bases go through their autograd functions
    when a gradient is needed (their kernels have no backward of their own)."""
    if torch.is_grad_enabled() and x.requires_grad:
        if isinstance(base, GGMLLinear):
            return _PackedMatmul.apply(x, base.weight)
        if isinstance(base, (weight_only.Int8Linear, weight_only.Int4Linear)):
            return _WeightOnlyMatmul.apply(x, base)
    return base(x)


class LoRALinear(nn.Module):
    """A frozen `base` projection plus a trainable rank-r update (PEFT's names: lora_A, lora_B)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.scaling = rank, alpha / rank
        device = _device_of(base)
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT `reset_lora_parameters`
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = base_forward(self.base, x)
        if not self.enabled:
            return y
        # float32 adapter weights meet the activations' dtype (bf16 models); autocast casts on its own.
        a, b = self.lora_A.weight.to(x.dtype), self.lora_B.weight.to(x.dtype)
        return y + F.linear(F.linear(self.dropout(x), a), b) * self.scaling

    def delta(self) -> torch.Tensor:
        """The update as a dense (out, in) float32 matrix: scaling * B @ A."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}"


def _device_of(module: nn.Module) -> torch.device:
    t = next(iter(module.buffers()), None) if not list(module.parameters()) else next(module.parameters())
    return t.device if t is not None else torch.device("cpu")


def targets_of(net: nn.Module, config: LoRAConfig) -> list[str]:
    """Qualified names of the modules `config` wraps: layers.N.<...>.<target> projections."""
    names = []
    for name, mod in net.named_modules():
        parts = name.split(".")
        if len(parts) < 3 or parts[0] != "layers" or parts[-1] not in config.targets:
            continue
        if config.layers is not None and int(parts[1]) not in config.layers:
            continue
        if not hasattr(mod, "in_features") or not hasattr(mod, "out_features"):
            continue
        names.append(name)
    return names


def apply_lora(net: nn.Module, config: LoRAConfig, seed: int | None = None) -> dict[str, LoRALinear]:
    """Freeze `net` and wrap every target projection in a LoRALinear, in place. Returns {name: wrapper}."""
    if any(isinstance(m, LoRALinear) for m in net.modules()):
        raise TrainingError("this model already carries LoRA adapters; merge or remove them first")
    names = targets_of(net, config)
    if not names:
        raise TrainingError(f"no module of this model matches the LoRA targets {list(config.targets)}")
    for p in net.parameters():
        p.requires_grad_(False)
    if seed is not None:
        torch.manual_seed(seed)
    wrapped = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name)
        wrapper = LoRALinear(getattr(parent, child), config.rank, config.alpha, config.dropout)
        setattr(parent, child, wrapper)
        wrapped[name] = wrapper
    return wrapped


def lora_modules(net: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in net.named_modules() if isinstance(m, LoRALinear)}


def set_enabled(net: nn.Module, enabled: bool) -> None:
    """Switch every adapter on or off (off: the base model, e.g. DPO's reference)."""
    for m in lora_modules(net).values():
        m.enabled = enabled


class adapters_disabled:
    """Context manager: the base model's forward, adapters off."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net

    def __enter__(self):
        set_enabled(self.net, False)

    def __exit__(self, *exc):
        set_enabled(self.net, True)


def merge_lora(net: nn.Module) -> None:
    """Fold every adapter into its base weight and put a plain nn.Linear back (a quantized base becomes float32)."""
    for name, m in lora_modules(net).items():
        if isinstance(m.base, (weight_only.Int8Linear, weight_only.Int4Linear)):
            dense, dtype = weight_only.dequantize(m.base), torch.float32
        else:
            w = m.base.weight
            dense = w.dequantize(torch.float32) if isinstance(w, GGMLWeight) else w.detach().float()
            dtype = torch.float32 if isinstance(w, GGMLWeight) else w.dtype
        merged = nn.Linear(m.in_features, m.out_features, bias=False, device=dense.device)
        merged.weight = nn.Parameter((dense + m.delta().to(dense.device)).to(dtype), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent_name), child, merged)


def lora_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under our module names: {"layers.0.attention.wq.lora_A.weight": ...}."""
    return {k: v for k, v in net.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def trainable_parameters(net: nn.Module) -> list[nn.Parameter]:
    return [p for p in net.parameters() if p.requires_grad]


__all__ = ["LoRAConfig", "LoRALinear", "apply_lora", "merge_lora", "lora_modules", "lora_state", "adapters_disabled",
           "set_enabled", "trainable_parameters"]
