"""GPTQ and AWQ Hugging Face checkpoints: their packed codes repacked at load into the weight-only kernels' codes.

The formats, as their published sources pack them (read for understanding; written here from the rules):

  GPTQ (AutoGPTQ `nn_modules/qlinear`, transformers / optimum's GPTQ integration), bits b in {4, 8}, p = 32 / b:
    qweight int32 (K/p, N): code[k, n] = qweight[k // p, n] >> (b * (k % p)) & (2^b - 1)   (packed along input)
    qzeros  int32 (K/G, N/p): zero[g, n] = qzeros[g, n // p] >> (b * (n % p)) & (2^b - 1), plus 1 in the
            original ("gptq", v1) checkpoint format, which stores zero - 1; "gptq_v2" (GPTQModel) stores zero
    scales  float16 (K/G, N);  g_idx int32 (K,): the group of input k (with desc_act, not k // G)
    w[n, k] = scales[g_idx[k], n] * (code[k, n] - zero[g_idx[k], n])
  AWQ, GEMM version (AutoAWQ `quantize/quantizer.py`, `modules/linear/gemm.py`), 4 bits:
    qweight int32 (K, N/8): nibble i of qweight[k, c] holds column 8c + [0, 2, 4, 6, 1, 3, 5, 7][i]
    qzeros  int32 (K/G, N/8), packed the same way;  scales float16 (K/G, N)
    w[n, k] = scales[k // G, n] * (code[k, n] - zero[k // G, n])

Repacked per module when the model is built (never the whole model dequantised): 4-bit codes become llamaherd's
int4 codes (two a byte, quant/weight_only.py) with float32 scale s and zero z = s * (8 - zero), so that
(q - 8) * s + z is the format's s * (q - zero) exactly in float32; 8-bit codes stay bytes with z = -s * zero.
desc_act's g_idx is handled by reordering the input columns so that each group is contiguous, and gathering the
activations in that order before each product. Products of 1..16 rows run on native/weight_only.c; the rest
(prefill) multiply by the layer's dequantised float32 matrix, made for that call only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..native import weight_only as native_wo
from .weight_only import QuantizeError, pack_nibbles, unpack_nibbles

METHODS = ("gptq", "awq")
PACKED_LEAVES = ("qweight", "qzeros", "scales", "g_idx")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's pack order: nibble i holds column AWQ_ORDER[i] of 8


@dataclass(frozen=True)
class Format:
    method: str
    bits: int
    group_size: int  # -1: one group over the whole input
    zeros_stored_minus_one: bool  # GPTQ's original checkpoint format


def reads(qc) -> bool:
    """Whether a config.json quantization_config is one this module loads."""
    return isinstance(qc, dict) and qc.get("quant_method") in METHODS


def parse(qc: dict) -> Format:
    """The packing a quantization_config describes; a QuantizeError naming the field it cannot run."""
    method = qc.get("quant_method")
    bits, group = qc.get("bits", qc.get("w_bit")), qc.get("group_size", qc.get("q_group_size"))
    if not isinstance(group, int) or isinstance(group, bool) or not (group > 0 or group == -1):
        raise QuantizeError(f"{method} group_size {group!r}: expected a positive whole number or -1")
    if method == "gptq":
        if bits not in (4, 8):
            raise QuantizeError(f"GPTQ with {bits!r} bits is not supported; llamaherd runs 4- and 8-bit GPTQ")
        fmt = qc.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise QuantizeError(f"GPTQ checkpoint_format {fmt!r} is not supported; it reads gptq and gptq_v2")
        return Format("gptq", bits, group, fmt == "gptq")
    version = str(qc.get("version", "gemm")).lower()
    if bits != 4 or version != "gemm" or qc.get("zero_point", True) is not True:
        raise QuantizeError(f"AWQ bits={bits!r} version={version!r} zero_point={qc.get('zero_point', True)!r} is not "
                            "supported; llamaherd reads 4-bit GEMM AWQ with zero points (AutoAWQ's default)")
    return Format("awq", 4, group, False)


def split(raw: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """A checkpoint's tensors -> (the float ones, {module name: {qweight, qzeros, scales[, g_idx, bias]}})."""
    modules = {name.rsplit(".", 1)[0] for name in raw if name.rsplit(".", 1)[-1] == "qweight"}
    plain, packed = {}, {m: {} for m in modules}
    for name, t in raw.items():
        module, _, leaf = name.rpartition(".")
        if module in modules and leaf in (*PACKED_LEAVES, "bias"):
            packed[module][leaf] = t
        else:
            plain[name] = t
    return plain, packed


# -- unpacking ------------------------------------------------------------------------------------------------


def _fields(t: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 (R, C) -> (R, C, 32 / bits) int64: field j is bits j*b .. j*b + b - 1 (the lowest first)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    return (t.to(torch.int64)[..., None] >> shifts) & ((1 << bits) - 1)


def unpack(tensors: dict[str, torch.Tensor], fmt: Format, where: str) -> tuple[torch.Tensor, ...]:
    """One module's packed tensors -> (codes (N, K) int64, scales (N, G) float32, zeros (N, G) int64, g_idx (K,))."""
    try:
        qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    except KeyError as exc:
        raise QuantizeError(f"{where}: {exc.args[0]} is missing beside qweight; the checkpoint is incomplete") from None
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32 or qweight.dim() != 2 or qzeros.dim() != 2 \
            or scales.dim() != 2 or not scales.is_floating_point():
        raise QuantizeError(f"{where}: qweight/qzeros must be 2-D int32 and scales 2-D float, got {qweight.dtype} "
                            f"{tuple(qweight.shape)}, {qzeros.dtype} {tuple(qzeros.shape)}, {scales.dtype}")
    if fmt.method == "gptq":
        codes = _fields(qweight, fmt.bits).permute(0, 2, 1).reshape(-1, qweight.shape[1])  # (K, N)
        zeros = _fields(qzeros, fmt.bits).reshape(qzeros.shape[0], -1)  # (G, N)
        zeros = zeros + 1 if fmt.zeros_stored_minus_one else zeros
    else:
        inverse = torch.tensor([AWQ_ORDER.index(j) for j in range(8)])  # column j of 8 sits in nibble inverse[j]
        codes = _fields(qweight, 4)[..., inverse].reshape(qweight.shape[0], -1)
        zeros = _fields(qzeros, 4)[..., inverse].reshape(qzeros.shape[0], -1)
    K, N = codes.shape
    G = K if fmt.group_size == -1 else fmt.group_size
    g_idx = tensors.get("g_idx")
    g_idx = torch.arange(K) // G if g_idx is None else g_idx.to(torch.int64)
    if K % G or scales.shape != (K // G, N) or zeros.shape != scales.shape or g_idx.shape != (K,) \
            or int(g_idx.min()) < 0 or int(g_idx.max()) >= K // G:
        raise QuantizeError(f"{where}: shapes disagree with {fmt.bits}-bit groups of {G}: qweight "
                            f"{tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, scales {tuple(scales.shape)}, g_idx "
                            f"{tuple(g_idx.shape)}; the config.json does not describe these tensors")
    return codes.t(), scales.float().t(), zeros.t(), g_idx


# -- the module -------------------------------------------------------------------------------------------------


class PackedLinear(nn.Module):
    """A Linear over GPTQ / AWQ codes repacked for the weight-only kernels (see the module docstring).

    Its tensors are buffers outside the state dict (they are made from the checkpoint's own tensors when the
    model is built, and never converted to the model's dtype: the float32 scales are what makes it exact).
    """

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                 bits: int, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        N, K = codes.shape
        G = K // scales.shape[1]
        self.in_features, self.out_features, self.bits, self.group_size = K, N, bits, G
        perm = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[perm], torch.arange(K) // G):
            raise QuantizeError(f"g_idx does not split the {K} inputs into groups of {G}; the checkpoint is corrupt")
        identity = torch.equal(perm, torch.arange(K))
        self.register_buffer("perm", None if identity else perm, persistent=False)
        codes = codes if identity else codes[:, perm]
        if bits == 4:  # (q - 8) * s + z == s * (q - zero)
            self.register_buffer("qweight", pack_nibbles(codes.to(torch.uint8)).contiguous(), persistent=False)
            z = scales * (8 - zeros).float()
        else:  # q * s + z == s * (q - zero)
            self.register_buffer("qweight", codes.to(torch.uint8).contiguous(), persistent=False)
            z = -scales * zeros.float()
        self.register_buffer("scales", scales.t().contiguous(), persistent=False)  # (G, N) float32
        self.register_buffer("zeros", z.t().contiguous(), persistent=False)
        self.register_buffer("bias", None if bias is None or not bias.any() else bias.float(), persistent=False)
        self._codes: native_wo.Codes | None = None

    def dequantized(self) -> torch.Tensor:
        """The float32 (N, K) matrix this module multiplies by, in its (possibly reordered) input order."""
        q = unpack_nibbles(self.qweight).float() - 8 if self.bits == 4 else self.qweight.float()
        g = torch.arange(self.in_features) // self.group_size
        return q * self.scales.t()[:, g] + self.zeros.t()[:, g]

    def _native_ok(self) -> bool:
        step = 32 if self.bits == 4 else 16
        return self.group_size % step == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        if self._native_ok() and native_wo.applies(x, self.in_features):
            if self._codes is None or self._codes.key != native_wo.key([(self.qweight, self.scales, self.zeros)]):
                scheme = "int4" if self.bits == 4 else "grouped8"
                self._codes = native_wo.Codes([(self.qweight, self.scales, self.zeros)], scheme, self.group_size)
            y = self._codes(x)[0]
        else:  # the reference: this layer's float32 matrix, made for this call only
            y = F.linear(x.float(), self.dequantized()).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        order = ", act-order" if self.perm is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.bits}-bit groups of "
                f"{self.group_size}{order}")


def module(tensors: dict[str, torch.Tensor], fmt: Format, where: str, rows=None) -> PackedLinear:
    """The PackedLinear of one checkpoint module; `rows` reorders output rows (HF -> Meta RoPE order of wq/wk)."""
    codes, scales, zeros, g_idx = unpack(tensors, fmt, where)
    bias = tensors.get("bias")
    if rows is not None:
        codes, scales, zeros = rows(codes), rows(scales), rows(zeros)
        bias = None if bias is None else rows(bias[:, None])[:, 0]
    return PackedLinear(codes, scales, zeros, g_idx, fmt.bits, bias)


__all__ = ["Format", "METHODS", "PackedLinear", "module", "parse", "reads", "split", "unpack"]
