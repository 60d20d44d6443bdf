"""FP8 projections kept in float8_e4m3fn and multiplied by `torch._scaled_mm`: an FP8 checkpoint's own codes, or a
float model's projections quantized at load (`quantize="fp8"`).

The arithmetic is the one FP8 serving stacks run on a GPU (vLLM's Fp8LinearMethod, fbgemm's f8f8bf16_rowwise,
compressed-tensors' FP8 schemes): the weight is e4m3 codes times one float32 scale per output channel (a
per-tensor scale is the same scale on every row); the activations are quantized to e4m3 as they arrive, each
token's row with its own scale amax / 448 ("dynamic", optionally with amax clamped to an upper bound: fbgemm's
`activation_scale_ub`), or every row with the checkpoint's fixed `input_scale` ("static"); the product of codes
is accumulated in float32 and scaled by both scales (`_scaled_mm` with row-wise scales).

Where it runs: on CUDA devices with FP8 tensor cores (compute capability 8.9 and newer) this is the fast path
and the memory saving. On the CPU `torch._scaled_mm` exists but is a slow reference (tens of times the bf16
product), so the CPU default for FP8 checkpoints stays the bf16 dequantisation of quant/fp8.py; asking for
`quantize="fp8"` on the CPU runs these very modules, which is how the numbers of the GPU path are checked
on a machine without one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.moe import Experts
from .weight_only import QuantizeError

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448: the largest finite e4m3 value (OCP 8-bit floating point spec, E4M3)
ALIGN = 16  # _scaled_mm's CUDA kernels take inner and output widths in multiples of 16 (cuBLASLt FP8 rules)
_MIN_SCALE = 1.0 / (E4M3_MAX * 512.0)  # an all-zero row gets a finite scale (fbgemm quantize_fp8_per_row's floor)


def cuda_fp8(device: torch.device | str | None) -> bool:
    """Whether `device` is a CUDA device whose tensor cores multiply e4m3 (Ada / Hopper and newer: sm_89+)."""
    if device is None or torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(torch.device(device)) >= (8, 9)


def quantize_rows(x: torch.Tensor, ub: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> (e4m3 codes, float32 scales (M, 1)): each row on its own amax / 448, amax clamped to `ub`."""
    amax = x.abs().amax(dim=-1, keepdim=True).to(torch.float32)
    if ub is not None:
        amax = amax.clamp(max=ub)
    scale = (amax / E4M3_MAX).clamp(min=_MIN_SCALE)
    return (x.to(torch.float32) / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> (e4m3 codes, float32 scales (N,)): one scale per output channel, amax / 448."""
    q, s = quantize_rows(w.detach())
    return q, s.reshape(-1)


def fits(out_features: int, in_features: int) -> bool:
    """Widths `_scaled_mm` takes on every device; other projections stay in float (the same on CPU and GPU)."""
    return out_features % ALIGN == 0 and in_features % ALIGN == 0


def _scaled(xq: torch.Tensor, sx: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
            out_dtype: torch.dtype) -> torch.Tensor:
    """(M, K) e4m3 x (N, K) e4m3 codes -> (M, N) float: the one call of `torch._scaled_mm` with row-wise scales."""
    m = xq.shape[0]
    if xq.is_cuda and m % ALIGN:  # CUDA's kernels take rows in tiles of 16: zero rows quantize to zero codes
        pad = ALIGN - m % ALIGN
        xq, sx = torch.cat([xq, xq.new_zeros(pad, xq.shape[1])]), torch.cat([sx, sx.new_ones(pad, 1)])
    return torch._scaled_mm(xq, codes.t(), scale_a=sx, scale_b=scales, out_dtype=out_dtype)[:m]


class Fp8Linear(nn.Module):
    """A Linear whose weight is e4m3 codes with one float32 scale per output channel; activations quantized to
    e4m3 per token (dynamic) or with a fixed scale (static `input_scale`); products by `torch._scaled_mm`."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, *, input_scale: torch.Tensor | None = None,
                 scale_ub: float | None = None, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        n, k = weight.shape
        if weight.dtype != E4M3:
            raise QuantizeError(f"FP8 weights must be float8_e4m3fn codes, not {weight.dtype}")
        if not fits(n, k):
            raise QuantizeError(f"a ({n}, {k}) FP8 weight: torch._scaled_mm needs both widths multiples of {ALIGN}")
        s = weight_scale.detach().to(torch.float32).reshape(-1)
        scales = [t for t in (s, input_scale) if t is not None and t.device.type != "meta"]  # meta: a size plan
        if not all(torch.isfinite(t).all() for t in scales):
            raise QuantizeError("an FP8 scale holds NaN or infinite values")
        if s.numel() == 1:
            s = s.expand(n)  # per tensor: the same scale on every row
        if s.numel() != n:
            raise QuantizeError(f"an FP8 weight of {n} rows needs one scale or one per row, "
                                f"not {tuple(weight_scale.shape)}")
        self.in_features, self.out_features = k, n
        # Not in the state dict: a checkpoint's float tensors are assigned around these modules (checkpoint/base.py).
        self.register_buffer("weight", weight.detach().contiguous(), persistent=False)
        self.register_buffer("weight_scale", s.reshape(1, n).contiguous(), persistent=False)  # _scaled_mm's scale_b
        self.register_buffer("input_scale", None if input_scale is None else
                             input_scale.detach().to(torch.float32).reshape(()), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)
        self.scale_ub = scale_ub

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Fp8Linear:
        """A float projection quantized per output channel, with dynamic per-token activations."""
        q, s = quantize_weight(weight)
        return cls(q, s, bias=bias)

    def quantize_input(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, K) activations -> (e4m3 codes, float32 scales (M, 1)) by this module's activation scheme."""
        if self.input_scale is None:
            return quantize_rows(x2, self.scale_ub)
        s = self.input_scale
        q = (x2.to(torch.float32) / s).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
        return q, s.expand(x2.shape[0], 1).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        xq, sx = self.quantize_input(x2)
        # On CUDA, row-wise scaled products come out in bf16; the CPU reference computes in float32.
        y = _scaled(xq, sx, self.weight, self.weight_scale, torch.bfloat16 if x.is_cuda else torch.float32)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        acts = "static input scale" if self.input_scale is not None else \
            "dynamic per token" + (f", amax <= {self.scale_ub:g}" if self.scale_ub is not None else "")
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 per channel, {acts}"


class Fp8Bank(nn.Module):
    """One projection of E experts: e4m3 codes (S, E, N, K_s) with float32 scales (S, E, N) per expert and output
    row, its input cut into S slices along K, each slice's activations quantized per token on their own.

    S > 1 is Meta's FP8 Llama 4 release: the row-parallel w2 of each of its model-parallel ranks carries its own
    scales, and each rank quantizes its own slice of the hidden activations (llama-models quantize_impls
    `ffn_swiglu_dynamic` per rank, summed by the all-reduce); S = 1 is every other case.
    """

    def __init__(self, slices: list[tuple[torch.Tensor, torch.Tensor]], scale_ub: float | None = None) -> None:
        super().__init__()
        for codes, scales in slices:
            if codes.dtype != E4M3 or codes.dim() != 3 or tuple(scales.shape) != tuple(codes.shape[:2]):
                raise QuantizeError(f"an FP8 expert bank needs (E, out, in) e4m3 codes and (E, out) scales, not "
                                    f"{tuple(codes.shape)} {codes.dtype} and {tuple(scales.shape)}")
            if not fits(codes.shape[1], codes.shape[2]):
                raise QuantizeError(f"an FP8 expert bank of {tuple(codes.shape)}: torch._scaled_mm needs both widths "
                                    f"multiples of {ALIGN}")
        self.widths = [codes.shape[2] for codes, _ in slices]
        self.register_buffer("codes", torch.stack([c.contiguous() for c, _ in slices]), persistent=False)
        self.register_buffer("scales", torch.stack([s.to(torch.float32) for _, s in slices]).unsqueeze(2),
                             persistent=False)  # (S, E, 1, N): each expert's row-wise scale_b
        self.scale_ub = scale_ub

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        out_dtype = torch.bfloat16 if x.is_cuda else torch.float32
        y = None
        for s, part in enumerate(torch.split(x, self.widths, dim=-1)):
            xq, sx = quantize_rows(part, self.scale_ub)
            ys = _scaled(xq, sx, self.codes[s, expert], self.scales[s, expert], out_dtype)
            y = ys if y is None else y + ys
        return y.to(x.dtype)


class Fp8Experts(nn.Module):
    """model/moe.py's Experts with its three stacked projections as FP8 banks: same call, `experts(x, e)`."""

    def __init__(self, gate: Fp8Bank, up: Fp8Bank, down: Fp8Bank) -> None:
        super().__init__()
        self.gate, self.up, self.down = gate, up, down

    @classmethod
    def from_float(cls, experts: nn.Module) -> Fp8Experts:
        """Each expert's projections quantized per output row; Meta's (E, in, out) stacks read as (E, out, in)."""
        def bank(w: torch.Tensor) -> Fp8Bank:
            q, s = quantize_rows(w.detach().transpose(1, 2))
            return Fp8Bank([(q, s.squeeze(-1))])
        return cls(bank(experts.moe_w_in_eD_F), bank(experts.moe_w_swiglu_eD_F), bank(experts.moe_w_out_eF_D))

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        return self.down(F.silu(self.gate(x, expert)) * self.up(x, expert), expert)


def compressed_tensors_config(static_inputs: bool, ignore: list[str]) -> dict:
    """config.json's quantization_config for per-channel e4m3 weights, as llm-compressor writes its FP8_DYNAMIC
    (per-token dynamic activations) and FP8 (static per-tensor input_scale) presets (compressed-tensors
    QuantizationScheme / QuantizationArgs fields)."""
    acts = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": not static_inputs,
            "strategy": "tensor" if static_inputs else "token"}
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": "channel"}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}},
            "ignore": ignore}


def quantizable(name: str, module: nn.Module) -> bool:
    """A 2-D Linear of the decoder (not the vocabulary output) whose widths `_scaled_mm` takes."""
    return isinstance(module, nn.Linear) and name.split(".")[-1] != "output" and \
        fits(module.out_features, module.in_features)


def quantize(net: nn.Module) -> list[str]:
    """Replace every quantizable float Linear of a loaded model with an Fp8Linear, and each stack of MoE experts
    with Fp8Experts, in place; return their names.

    The vocabulary projection stays in float, as FP8 checkpoints and serving stacks keep it (its error is
    the logits' own). Modules already FP8 (an FP8 checkpoint's codes) are left as they are.
    """
    done = []
    for parent_name, parent in list(net.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if quantizable(full, child):
                setattr(parent, name, Fp8Linear.from_float(child.weight, child.bias))
                done.append(full)
            elif type(child) is Experts and fits(*child.moe_w_in_eD_F.shape[1:]):
                setattr(parent, name, Fp8Experts.from_float(child))
                done.append(full)
    if not done:
        raise QuantizeError("nothing in this model can be quantized to fp8: no Linear has widths that are "
                            f"multiples of {ALIGN}")
    return done


__all__ = ["ALIGN", "E4M3_MAX", "Fp8Bank", "Fp8Experts", "Fp8Linear", "compressed_tensors_config", "cuda_fp8", "fits",
           "quantize", "quantize_rows", "quantize_weight"]
