"""Meta's own int4 checkpoints: Llama 3.2 1B/3B QLoRA / SpinQuant (INT4_EO8) projections, Llama 4's int4 experts.

Llama 3.2 1B/3B `-QLORA_INT4_EO8` and `-SpinQuant_INT4_EO8` (llama-models `sku_list.llama3_2_quantized_models`),
read as llama-models' `llama3/quantization/loader.py` builds them
(`_prepare_model_int4_weight_int8_dynamic_activation`):

- every Linear of the blocks is torchao's `Int8DynActInt4WeightLinear` (torchao `quantization/GPTQ.py`, since
  moved to `quantization/linear_quant_modules.py`):
  `X.weight` int8 (N, K) holding int4 values -8..7, `X.scales` (N, K/g) float32, `X.zeros` the same shape or
  absent (the loader's load hook: absent means 0), g = params.json `quantization_args.group_size` (32 in the
  released files: ExecuTorch's recipes for them, examples/models/llama/config/llama_xnnpack_{qat,spinquant}.yaml,
  pass preq_group_size 32 and model.py asserts it equals params.json's; sku_list's 256 is not what the files
  say). Dequantisation (torchao `linear_forward_8da4w`, quantized_decomposed `dequantize_per_channel_group`):
  w[n, k] = (q[n, k] - zeros[n, k // g]) * scales[n, k // g]. torchao also rounds each activation row to int8
  (per-token dynamic quantization) before the product; the products here run through our int4 path instead
  (`hf_quantized.PackedLinear`, as GPTQ / AWQ do: float32 scales kept exact, any group a multiple of 32, so 256
  needs no splitting; the native kernels for decode rows, on the activation codes their switches choose, int8
  blocks of 32 by default; the float32 dequantised matrix for prefill).
- with `lora_args` {rank, scale} (the QLoRA files), each of them also has Meta's adaptor `X.adaptor.A.weight`
  (rank, K) and `X.adaptor.B.weight` (N, rank): y += B(A(x)) * scale (`Int8DynActInt4WeightLinearLoRA.forward`).
- `tok_embeddings` and `output` are int8 with per-row `scales` ((N,) or (N, 1)), read as Meta's
  `Int8WeightEmbedding` / `Int8WeightLinear` load hooks do: dequantised (weight * scales) into the checkpoint's
  float dtype. The embedding stays so (a row gather: nothing for int8 codes to speed up). An output equal to the
  embedding (Llama 3.2 1B/3B tie them) is tied as the float release is, and its vocabulary projection runs on the
  int8 codes themselves (`Int8RowsLinear`: the byte-code kernels, float32 scales kept exact), since that one matrix
  weighs as much as all the int4 layers of the 1B model; an untied output stays the dequantised float matrix.
- `quantization_args.spinquant` (the SpinQuant files): the online Hadamard rotation R4 before each feed-forward
  down projection w2 (SpinQuant, arXiv 2405.16406; llama-stack meta_reference `hadamard_utils.py`
  `add_hadamard_transform_for_spinquant`, ExecuTorch `source_transformation/spin_quant.py`: w2(H x / sqrt(n)),
  H the Sylvester Hadamard matrix): the released w2 weights were rotated to expect it. R1/R2 are folded into the
  weights; R3 only matters with a quantized KV cache.

Llama 4 `int4_scales_{rank}.pt` (llama-models `llama4/scripts/quantize.py` int4_mixed, read by
`llama4/quantization/loader.py` + `quantize_impls.load_int4`): each MoE layer's routed expert stack (E, in, out) is
transposed to (E, out, in), each expert quantized by `int4_row_quantize` (symmetric, q = round(w / s) in -8..7,
s = absmax / 8 over groups of 128 inputs, zero point 0) and packed by `pack_int4` (byte j of a row: low nibble
input 2j, high nibble input 2j + 1, two's complement); the .pth holds those bytes transposed back and flattened
to (E * in / 2, out) (viewed as float8_e4m3fn), the scales file (E, in / 128, out) float32 under
"layers.{i}.feed_forward.experts.{w1,w3,w2}" (and "...shared_expert.{w1,w3,w2}" for a shared expert quantized
the same way, (out, in / 2) codes and (in / 128, out) scales, as the int4_mixed loader reads). Those experts are
dequantised per shard at load into the checkpoint's float dtype, as Meta's FP8 experts are (quant/fp8.py):
our MoE runs float expert banks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..native import weight_only as native_wo
from . import fp8
from .hf_quantized import PackedLinear
from .weight_only import QuantizedVocabProjection

SCHEME = "int4_weight_int8_dynamic_activation"  # llama-models llama3/args.py QuantizationScheme, the only one
GROUP_SIZES = (32, 64, 128, 256)  # what ExecuTorch's pre-quantization transform accepts
LLAMA4_EXPERTS = fp8.META_EXPERTS  # scales key leaf -> canonical expert stack name


class MetaInt4Error(ValueError):
    """A params.json or tensor this reader cannot run; the checkpoint reader turns it into a CheckpointError."""


@dataclass(frozen=True)
class Int4Args:
    """params.json's quantization_args and lora_args (llama-models llama3/args.py QuantizationArgs, LoRAArgs)."""

    group_size: int
    lora_rank: int | None = None
    lora_scale: float | None = None
    spinquant: bool = False

    def describe(self) -> str:
        parts = [f"int4 groups of {self.group_size}"]
        if self.lora_rank:
            parts.append(f"LoRA adaptor rank {self.lora_rank}")
        if self.spinquant:
            parts.append("SpinQuant")
        return "Meta " + ", ".join(parts)


def parse_args(params: dict[str, Any]) -> Int4Args | None:
    """The int4 arguments of a Llama 3 params.json, None when it states none."""
    qa, lora = params.get("quantization_args"), params.get("lora_args")
    if qa is None:
        if lora is not None:
            raise MetaInt4Error("params.json has lora_args but no quantization_args; Meta's int4 releases state both")
        return None
    if not isinstance(qa, dict):
        raise MetaInt4Error(f"quantization_args must be an object, got {qa!r}")
    scheme = qa.get("scheme", SCHEME)
    if scheme != SCHEME:
        raise MetaInt4Error(f"quantization_args.scheme {scheme!r} is not supported; Meta's int4 releases use "
                            f"{SCHEME!r}")
    group = qa.get("group_size")
    if group not in GROUP_SIZES or isinstance(group, bool):
        raise MetaInt4Error(f"quantization_args.group_size {group!r} is not one of {GROUP_SIZES}; "
                            "restore the release's params.json")
    spin = qa.get("spinquant", False)
    if not isinstance(spin, bool):
        raise MetaInt4Error(f"quantization_args.spinquant must be true or false, got {spin!r}")
    if lora is None:
        return Int4Args(group, spinquant=spin)
    rank, scale = (lora.get("rank"), lora.get("scale")) if isinstance(lora, dict) else (None, None)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0 or not isinstance(scale, (int, float)) \
            or isinstance(scale, bool):
        raise MetaInt4Error(f"lora_args must be {{'rank': positive int, 'scale': number}}, got {lora!r}")
    return Int4Args(group, rank, float(scale), spin)


# -- SpinQuant's online rotation --------------------------------------------------------------------------------


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """x @ H / sqrt(n) over the last dimension (n a power of two, H Sylvester's Hadamard matrix), in float32 at least.

    The fast Walsh-Hadamard transform: log2(n) butterfly stages (x_a, x_b) -> (x_a + x_b, x_a - x_b) over halves of
    growing blocks, the natural (Sylvester) order that llama-stack's and ExecuTorch's transforms use.
    """
    n = x.shape[-1]
    y = x.to(torch.promote_types(x.dtype, torch.float32)).reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    return (y.reshape(x.shape) * n ** -0.5).to(x.dtype)


# -- Llama 3.2 int4 projections ---------------------------------------------------------------------------------


class MetaInt4Linear(PackedLinear):
    """A torchao int4 projection on our int4 path, with Meta's LoRA adaptor and SpinQuant's input rotation.

    forward(x) = W (R x) + scale * B(A(R x)), R the Hadamard rotation when `rotate` (SpinQuant's w2) or the
    identity; A and B are `adaptor.A` / `adaptor.B`, Meta's own parameter names, loaded like any float weight.
    """

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, *,
                 lora_rank: int | None = None, lora_scale: float | None = None, rotate: bool = False) -> None:
        N, K = q.shape
        G = K // scales.shape[1]
        # PackedLinear holds s * (code - zero) with unsigned codes: code = q + 8, zero = torchao's zero + 8.
        zero = torch.zeros_like(scales, dtype=torch.float32) if zeros is None else zeros.float()
        super().__init__((q + 8).to(torch.uint8), scales.float(), zero + 8, torch.arange(K) // G, bits=4)
        self.rotate, self.lora_scale = rotate, lora_scale
        self.adaptor: nn.Sequential | None = None
        if lora_rank is not None:
            self.adaptor = nn.Sequential()
            self.adaptor.add_module("A", nn.Linear(K, lora_rank, bias=False, device="meta"))
            self.adaptor.add_module("B", nn.Linear(lora_rank, N, bias=False, device="meta"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotate:
            x = hadamard(x)
        y = super().forward(x)
        if self.adaptor is not None:
            a, b = self.adaptor.A.weight, self.adaptor.B.weight
            y = y + F.linear(F.linear(x.to(a.dtype), a), b).to(y.dtype) * self.lora_scale
        return y

    def extra_repr(self) -> str:
        lora = f", LoRA adaptor rank {self.adaptor.A.out_features} x {self.lora_scale:g}" if self.adaptor else ""
        return super().extra_repr() + lora + (", Hadamard-rotated input" if self.rotate else "")


def linear(tensors: dict[str, torch.Tensor], args: Int4Args, name: str, rotate: bool) -> MetaInt4Linear:
    """The module of one torchao projection `name` from its `weight`, `scales` (and `zeros`)."""
    q, scales, zeros = tensors.get("weight"), tensors.get("scales"), tensors.get("zeros")
    if q is None or scales is None:
        missing = "weight" if q is None else "scales"
        raise MetaInt4Error(f"{name}.{missing} is missing beside {name}.{'scales' if q is None else 'weight'}; "
                            "the consolidated.00.pth is incomplete: download it again")
    if q.dtype != torch.int8 or q.dim() != 2:
        raise MetaInt4Error(f"{name}.weight is {q.dtype} {tuple(q.shape)}; torchao's int4 codes are 2-D int8")
    N, K = q.shape
    want = (N, K // args.group_size)
    if K % args.group_size or not scales.is_floating_point() or tuple(scales.shape) != want \
            or (zeros is not None and tuple(zeros.shape) != want):
        both = f"scales {tuple(scales.shape)}" + ("" if zeros is None else f", zeros {tuple(zeros.shape)}")
        raise MetaInt4Error(f"{name}: {both} do not give one per {args.group_size} inputs of the ({N}, {K}) weight "
                            f"{want}; params.json's quantization_args.group_size does not belong to these weights")
    if int(q.min()) < -8 or int(q.max()) > 7:
        raise MetaInt4Error(f"{name}.weight holds values outside -8..7: it is not int4 codes")
    rank = args.lora_rank if "adaptor.A.weight" in tensors else None
    if rotate and K & (K - 1):
        raise MetaInt4Error(f"{name}: SpinQuant's Hadamard rotation needs a power-of-two input width, not {K}")
    return MetaInt4Linear(q, scales, zeros, lora_rank=rank, lora_scale=args.lora_scale, rotate=rotate)


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """Meta's int8 embedding / output matrix as floats: q * scales (one scale per row, or per group of a row)."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise MetaInt4Error(f"{name}.weight is {q.dtype} {tuple(q.shape)} beside {name}.scales; expected 2-D int8")
    s = scales.squeeze(-1) if scales.dim() == 2 and scales.shape[-1] == 1 else scales
    try:
        return (q.to(torch.float32) * fp8.expand_scale(s, tuple(q.shape))).to(dtype)
    except fp8.FP8Error as exc:
        raise MetaInt4Error(f"{name}: {exc}") from None


class Int8RowsLinear(PackedLinear):
    """Meta's int8 vocabulary matrix (one float32 scale per row) as a `PackedLinear` of 8-bit codes, one group per row.

    Few rows run on the native byte-code kernels; more (a perplexity run's full logits) are multiplied by the
    dequantised matrix a chunk of rows at a time, never the whole float32 copy of a 128K-row vocabulary at once.
    """

    CHUNK_ROWS = 4096

    def __init__(self, q: torch.Tensor, scales: torch.Tensor) -> None:
        N, K = q.shape
        # PackedLinear's 8-bit rule w = s * (code - zero): code = q + 128, zero = 128.
        super().__init__((q.to(torch.int16) + 128).to(torch.uint8), scales.reshape(N, 1).float(),
                         torch.full((N, 1), 128), torch.zeros(K, dtype=torch.int64), bits=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._native_ok() and native_wo.applies(x, self.in_features):
            return super().forward(x)
        xf = x.float()
        y = xf.new_empty(*x.shape[:-1], self.out_features)
        s, z = self.scales[0], self.zeros[0]
        for i in range(0, self.out_features, self.CHUNK_ROWS):
            j = i + self.CHUNK_ROWS
            y[..., i:j] = F.linear(xf, self.qweight[i:j].float() * s[i:j, None] + z[i:j, None])
        return y.to(x.dtype)


def vocab_projection(q: torch.Tensor, scales: torch.Tensor) -> QuantizedVocabProjection:
    """The model's output layer over Meta's int8 `output.weight` / `output.scales` (checked by `dequantize_int8`)."""
    s = scales.reshape(-1)
    if s.shape != (q.shape[0],):
        raise MetaInt4Error(f"output.scales {tuple(scales.shape)} is not one scale per row of {tuple(q.shape)}")
    return QuantizedVocabProjection(Int8RowsLinear(q, s))


ADAPTOR_LEAVES = (".adaptor.A.weight", ".adaptor.B.weight")
INT8_MODULES = ("tok_embeddings", "output")  # Int8WeightEmbedding / Int8WeightLinear in Meta's loader


def split(sd: dict[str, torch.Tensor], args: Int4Args) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """A Llama 3.2 int4 state dict -> (the float state dict the model is assigned, {projection: its int4 tensors}).

    The int8 embedding and output come back dequantised; each torchao projection's `weight` / `scales` / `zeros`
    move to the second dict. Adaptor weights stay in the first (they are the module's float parameters) and are
    noted in the second, so that the module is built with an adaptor.
    """
    dtype = next((t.dtype for n, t in sd.items() if n.endswith("norm.weight") and t.is_floating_point()),
                 torch.bfloat16)
    int8 = {m for m in INT8_MODULES if f"{m}.scales" in sd}
    int4 = {n.removesuffix(".scales") for n in sd if n.endswith(".scales")} - int8
    plain: dict[str, torch.Tensor] = {}
    packed: dict[str, dict[str, torch.Tensor]] = {m: {} for m in int4}
    for n, t in sd.items():
        module, _, leaf = n.rpartition(".")
        if module in int8:
            if leaf == "weight":
                plain[n] = dequantize_int8(t, sd[f"{module}.scales"], dtype, module)
            elif leaf != "scales":
                raise MetaInt4Error(f"unexpected tensor {n} beside the int8 {module}.weight")
            continue
        if module in int4 and leaf in ("weight", "scales", "zeros"):
            packed[module][leaf] = t
            continue
        if n.endswith(ADAPTOR_LEAVES):
            owner = n[: -len(".adaptor.A.weight")]
            if args.lora_rank is None:
                raise MetaInt4Error(f"{n} is a LoRA adaptor weight but params.json has no lora_args (rank, scale); "
                                    "restore the release's params.json")
            if owner not in int4:
                raise MetaInt4Error(f"{n} adapts {owner}, which is no int4 projection of this checkpoint (it has no "
                                    f"{owner}.scales); the consolidated.00.pth is incomplete: download it again")
            packed[owner][n[len(owner) + 1:]] = t
        elif t.dtype == torch.int8:
            raise MetaInt4Error(f"{n} is int8 but {module}.scales is missing; the consolidated.00.pth is incomplete: "
                                "download it again")
        plain[n] = t
    for module, tensors in packed.items():
        if ("adaptor.A.weight" in tensors) != ("adaptor.B.weight" in tensors):
            raise MetaInt4Error(f"{module} has only one of adaptor.A.weight / adaptor.B.weight; download it again")
    return plain, packed


# -- Llama 4 int4 experts ---------------------------------------------------------------------------------------


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(..., C) bytes of `pack_int4` -> (..., 2C) int8 values -8..7: low nibble even input, high nibble odd."""
    b = packed.view(torch.int8) if packed.element_size() == 1 else packed
    low = (b & 0xF).to(torch.int8)
    low = torch.where(low > 7, low - 16, low).to(torch.int8)
    return torch.stack((low, b >> 4), dim=-1).flatten(-2)


def _dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(..., out, in/2) packed codes, (..., in/G, out) scales -> (..., out, in) float: q * scale of its group."""
    q = unpack_int4(codes).to(torch.float32)
    G = q.shape[-1] // scales.shape[-2]
    s = scales.to(torch.float32).transpose(-1, -2).repeat_interleave(G, dim=-1)
    return (q * s).to(dtype)


def dequantize_llama4_shard(sd: dict[str, torch.Tensor], scales: dict[str, torch.Tensor], n_experts: int,
                            ) -> dict[str, torch.Tensor]:
    """One rank's Llama 4 state dict (canonical names) with the int4 tensors its scales file names dequantised.

    Per shard, before shards are merged: the row-parallel w2's groups are cut within each rank's piece.
    """
    dtype = next((t.dtype for n, t in sd.items() if n.endswith("norm.weight") and t.is_floating_point()),
                 torch.bfloat16)
    out = dict(sd)
    for key, scale in scales.items():
        prefix, _, leaf = key.rpartition(".")
        routed = prefix.endswith(".experts")
        name = f"{prefix}.{LLAMA4_EXPERTS.get(leaf, leaf)}" if routed else f"{key}.weight"
        t = sd.get(name)
        if t is None or t.element_size() != 1 or not isinstance(scale, torch.Tensor) or not scale.is_floating_point():
            raise MetaInt4Error(f"the scales file names {key}, but the shard holds no int4 codes {name} for it")
        lead = (n_experts,) if routed else ()
        if scale.dim() != len(lead) + 2 or tuple(scale.shape[:len(lead)]) != lead:
            raise MetaInt4Error(f"{key}: scales of shape {tuple(scale.shape)} are not (in / group, out) per "
                                f"{'expert' if routed else 'matrix'}")
        groups, n_out = scale.shape[-2], scale.shape[-1]
        matrices = n_experts if routed else 1
        half = t.numel() // (matrices * n_out)  # in / 2 packed bytes per output row
        if half * n_out * matrices != t.numel() or (2 * half) % groups:
            raise MetaInt4Error(f"{name} holds {t.numel()} bytes, which are not {n_out} outputs of int4 codes in "
                                f"{groups} groups{' per expert' if routed else ''}; the shard and its scales disagree")
        if routed:  # stored (E * in/2, out) or (E, in/2, out): the (E, out, in/2) codes transposed back
            codes = t.reshape(n_experts, half, n_out).transpose(1, 2)
            out[name] = _dequantize(codes, scale, dtype).transpose(1, 2).contiguous()  # (E, in, out)
        else:  # nn.Linear weight (out, in/2)
            out[name] = _dequantize(t.reshape(n_out, half), scale, dtype)
    for name, t in out.items():
        if t.element_size() == 1 and (t.is_floating_point() or t.dtype == torch.int8):
            raise MetaInt4Error(f"{name} is {t.dtype} but the shard's int4_scales file names no scales for it")
    return out


__all__ = ["Int4Args", "Int8RowsLinear", "MetaInt4Error", "MetaInt4Linear", "SCHEME", "dequantize_int8",
           "dequantize_llama4_shard", "hadamard", "linear", "parse_args", "split", "unpack_int4", "vocab_projection"]
