"""FP8 checkpoints (compressed-tensors, fbgemm_fp8, fp8) dequantised tensor by tensor at load, on CPU.

The three `quantization_config.quant_method`s Hugging Face checkpoints of Llama carry for 8-bit floats:

- "compressed-tensors" (vLLM's llm-compressor; format "float-quantized" or "naive-quantized"):
  `X.weight` float8_e4m3fn (or int8 for naive int) and `X.weight_scale`: shape [1] (strategy "tensor"),
  [out, 1] ("channel"), [out, in / group] ("group") or [ceil(out / b0), ceil(in / b1)] ("block"); an
  asymmetric int scheme adds `X.weight_zero_point`. Activations: `X.input_scale` (static) or nothing
  (dynamic). Rule (compressed_tensors/quantization/lifecycle/forward.py `dequantize`):
  w = (q - zero_point) * scale, the scale broadcast over its block of q.
- "fbgemm_fp8" (transformers' FbgemmFp8Linear): `weight_scale` [out, 1], `input_scale_ub` for activations.
- "fp8" (transformers' FineGrainedFP8, DeepSeek-style): `weight_scale_inv` [ceil(out/128), ceil(in/128)],
  multiplied despite its name (transformers integrations/finegrained_fp8.py).

On CPU every weight is dequantised once, at load, into the checkpoint's own float dtype (bf16 in the
published files), one tensor at a time: the whole model is never held in float32. Activations then run in
that dtype, so a static `input_scale` (and fbgemm's `input_scale_ub`, and an FP8 KV-cache's `k_scale` /
`v_scale`) has nothing to scale and is dropped.
"""

from __future__ import annotations

from typing import Any

import torch

METHODS = ("compressed-tensors", "fbgemm_fp8", "fp8")
CT_FORMATS = ("float-quantized", "naive-quantized", "int-quantized")
SCALE_NAMES = ("weight_scale", "weight_scale_inv")
# Tensors of activation or KV-cache quantization: meaningless once the weights are float.
ACTIVATION_NAMES = ("input_scale", "input_scale_ub", "input_zero_point", "k_scale", "v_scale",
                    "output_scale", "output_zero_point")


class FP8Error(ValueError):
    """A quantization_config or tensor this reader cannot dequantise; the reader turns it into a CheckpointError."""


def reads(qc: Any) -> bool:
    """Whether `qc` (config.json's quantization_config) is an 8-bit weight format this module dequantises."""
    if not isinstance(qc, dict):
        return False
    method = qc.get("quant_method")
    if method in ("fbgemm_fp8", "fp8"):
        return True
    if method != "compressed-tensors" or qc.get("format") not in CT_FORMATS:
        return False
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        return False
    for group in groups.values():
        w = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(w, dict) or w.get("num_bits") != 8 or w.get("type") not in ("float", "int"):
            return False
    return True


def describe(qc: dict) -> str:
    """A short name of the scheme for messages and metadata: 'compressed-tensors fp8 (channel, dynamic)'."""
    if qc.get("quant_method") != "compressed-tensors":
        return str(qc.get("quant_method"))
    group = next(iter(qc["config_groups"].values()))
    w, a = group["weights"], group.get("input_activations") or {}
    kind = "fp8" if w.get("type") == "float" else "int8"
    acts = "weight-only" if not a else ("dynamic" if a.get("dynamic") else "static")
    return f"compressed-tensors {kind} ({w.get('strategy', 'tensor')}, {acts})"


def expand_scale(scale: torch.Tensor, shape: tuple[int, ...], block: tuple[int, int] | None = None) -> torch.Tensor:
    """`scale` broadcast over a weight of `shape` (float32): per tensor, channel, group or 2-D block.

    One scale per row (channel) or per row and `cols / n` columns (group) must divide the row evenly; any
    other tiling must be the declared `block` (rows x cols per scale, the last blocks cut at the edges).
    """
    s = scale.to(torch.float32)
    if not torch.isfinite(s).all():
        raise FP8Error(f"a scale of shape {tuple(scale.shape)} holds NaN or infinite values")
    if s.numel() == 1:
        return s.reshape(())
    rows, cols = shape[-2], shape[-1]
    if s.dim() == len(shape) - 1 and s.shape[-1] == rows:  # [out] per channel, stored without the unit column
        s = s.unsqueeze(-1)
    bad = FP8Error(f"a scale of shape {tuple(scale.shape)} does not tile a weight of shape {tuple(shape)}"
                   + (f" in blocks of {list(block)}" if block else ""))
    if s.dim() != len(shape) or tuple(s.shape[:-2]) != tuple(shape[:-2]):
        raise bad
    sr, sc = s.shape[-2], s.shape[-1]
    if sr == rows and cols % sc == 0:
        br, bc = 1, cols // sc
    elif block is not None and (sr, sc) == (-(-rows // block[0]), -(-cols // block[1])):
        br, bc = block
    else:
        raise bad
    return s.repeat_interleave(br, -2)[..., :rows, :].repeat_interleave(bc, -1)[..., :cols]


def block_size(qc: dict) -> tuple[int, int] | None:
    """The 2-D block of block-wise scales: fp8's weight_block_size, compressed-tensors' block_structure."""
    block = qc.get("weight_block_size")
    if block is None and qc.get("quant_method") == "compressed-tensors":
        block = next(iter(qc["config_groups"].values()))["weights"].get("block_structure")
    if block is None:
        return None
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise FP8Error(f"the block size {block!r} is not two positive whole numbers")
    return block[0], block[1]


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                      dtype: torch.dtype, block: tuple[int, int] | None = None) -> torch.Tensor:
    """(q - zero_point) * scale in float32, returned in `dtype`: one weight's float32 copy at a time."""
    w = q.to(torch.float32)
    if zero_point is not None:
        w = w - expand_scale(zero_point, tuple(q.shape), block)
    return (w * expand_scale(scale, tuple(q.shape), block)).to(dtype)


def _float_dtype(raw: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype of the checkpoint's unquantized tensors (norms, embeddings): what the weights become."""
    for name, t in raw.items():
        if t.is_floating_point() and t.element_size() > 1 and not name.endswith(SCALE_NAMES + ACTIVATION_NAMES):
            return t.dtype
    return torch.bfloat16


def dequantize(raw: dict[str, torch.Tensor], qc: dict) -> dict[str, torch.Tensor]:
    """The state dict (Hugging Face names) with every quantized weight replaced by its float value.

    A weight is quantized when it has a `weight_scale` / `weight_scale_inv` beside it; an 8-bit weight
    without one is an error, as is a scale without its weight.
    """
    dtype, block = _float_dtype(raw), block_size(qc)
    out: dict[str, torch.Tensor] = {}
    for name, t in raw.items():
        module, _, leaf = name.rpartition(".")
        if leaf in ACTIVATION_NAMES or leaf in SCALE_NAMES or leaf == "weight_zero_point":
            if leaf != "weight_zero_point" and leaf not in ACTIVATION_NAMES and f"{module}.weight" not in raw:
                raise FP8Error(f"{name} has no weight {module}.weight beside it")
            continue
        scale = next((raw[f"{module}.{s}"] for s in SCALE_NAMES if f"{module}.{s}" in raw), None)
        if leaf != "weight" or scale is None:
            if t.element_size() == 1 and (t.is_floating_point() or t.dtype == torch.int8):
                raise FP8Error(f"{name} is {t.dtype} but has no weight_scale beside it")
            out[name] = t
            continue
        out[name] = dequantize_weight(t, scale, raw.get(f"{module}.weight_zero_point"), dtype, block)
    return out


def kept_codes(raw: dict[str, torch.Tensor], qc: dict) -> dict[str, dict[str, torch.Tensor]]:
    """The e4m3 projections `fp8_mm.Fp8Linear` can run as stored: {module: weight, weight_scale[, input_scale][,
    input_scale_ub]} (Hugging Face names) for each float8 weight with a per-tensor or per-channel scale.

    Block- and group-scaled weights and int8 codes are not among them: they run dequantised.
    """
    if block_size(qc) is not None:
        return {}
    kept = {}
    for name, q in raw.items():
        module, _, leaf = name.rpartition(".")
        scale = raw.get(f"{module}.weight_scale")
        if leaf != "weight" or q.dtype != torch.float8_e4m3fn or scale is None or f"{module}.weight_zero_point" in raw:
            continue
        if scale.numel() != 1 and scale.numel() != q.shape[0]:
            continue  # group-wise: one scale per row and group of columns
        kept[module] = {"weight": q, "weight_scale": scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(())}
        for extra in ("input_scale", "input_scale_ub"):
            if f"{module}.{extra}" in raw:
                kept[module][extra] = raw[f"{module}.{extra}"]
    return kept


# -- Meta's Llama 4 FP8 release --------------------------------------------------------------------------------
# llama_models/llama4/quantization/loader.py: with `fp8_scales_{rank}.pt` beside consolidated.{rank}.pth, the
# routed experts' w1 / w3 / w2 of that rank hold e4m3 codes and the scales file maps
# "layers.{i}.feed_forward.experts.{w1,w3,w2}" to row-wise scales of the transposed (E, out, in) matrices
# (fbgemm quantize_fp8_per_row: one scale per expert and output row), read by load_fp8. In Meta's (E, in, out)
# layout: w[e, i, o] = code[e, i, o] * scale[e, o]. Layers left in bf16 (fp8_mixed: the first and last) have no key.
META_EXPERTS = {"w1": "moe_w_in_eD_F", "w3": "moe_w_swiglu_eD_F", "w2": "moe_w_out_eF_D"}


def meta_codes(sd: dict[str, torch.Tensor],
               scales: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One rank's FP8 expert stacks as stored: {canonical name: (codes (E, in, out), scales (E, out))}.

    What `fp8_mm.Fp8Experts` runs as it is; `dequantize_meta_shard` checks the same tensors and names the errors.
    """
    out = {}
    for key, scale in scales.items():
        prefix, _, leaf = key.rpartition(".")
        name = f"{prefix}.{META_EXPERTS.get(leaf, leaf)}"
        q = sd.get(name)
        stack = q is not None and q.dim() == 3 and q.dtype == torch.float8_e4m3fn
        if stack and scale.numel() == q.shape[0] * q.shape[2]:
            out[name] = (q, scale.to(torch.float32).reshape(q.shape[0], q.shape[2]))
    return out


def dequantize_meta_shard(sd: dict[str, torch.Tensor],
                          scales: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """One rank's Llama 4 state dict (canonical names, 3-D experts) with its FP8 experts dequantised.

    Per shard, before shards are merged: the row-parallel w2's scales are each rank's own.
    """
    if not scales:
        for name, t in sd.items():
            if t.element_size() == 1 and t.is_floating_point():
                raise FP8Error(f"{name} is {t.dtype} but no fp8_scales_<rank>.pt lies beside the shard")
        return sd
    dtype = _float_dtype(sd)
    out = dict(sd)
    for key, scale in scales.items():
        prefix, _, leaf = key.rpartition(".")
        name = f"{prefix}.{META_EXPERTS.get(leaf, leaf)}"
        q = sd.get(name)
        if q is None or q.dim() != 3:
            raise FP8Error(f"the scales file names {key}, but the shard holds no 3-D expert stack {name}")
        s = scale.to(torch.float32).reshape(q.shape[0], 1, -1)
        if not torch.isfinite(s).all():
            raise FP8Error(f"{key}: its scales hold NaN or infinite values")
        if s.shape[-1] != q.shape[-1]:
            raise FP8Error(f"{key}: {scale.numel()} scales do not give one per expert and output of {tuple(q.shape)}")
        out[name] = (q.to(torch.float32) * s).to(dtype)
    return dequantize_meta_shard(out, None)  # every e4m3 tensor must now be dequantised


__all__ = ["FP8Error", "METHODS", "block_size", "dequantize", "dequantize_meta_shard", "dequantize_weight", "describe",
           "expand_scale", "kept_codes", "meta_codes", "reads"]
