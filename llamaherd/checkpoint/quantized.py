"""Weight-only quantized models on disk: a Hugging Face folder plus the int8/int4 codes, loaded without re-quantizing.

Layout (staged beside the destination and renamed into place by `atomic.replacing_folder`):

    config.json           the model's config with "quantization_config": {"quant_method": "llamaherd",
                          "scheme": "int4", "group_size": 64, "weights": "llamaherd-quantized/weights.safetensors"}
    model.safetensors     the tensors that stay in float (embeddings, norms), under Hugging Face names
    llamaherd-quantized/weights.safetensors
                          each quantized module's `qweight`, `scales` (and `zeros`) under Meta names
                          (`layers.0.attention.wq.qweight`, `project.linear.scales`: the vocabulary matrix)
    tokenizer and generation files as `herd convert --format hf` writes them

GPTQ and AWQ folders (quant_method "gptq" / "awq") are read by `attach_packed`: each packed projection becomes a
`quant.hf_quantized.PackedLinear` as the model is built. Any other foreign quant_method (bitsandbytes, ...) is
refused with a CheckpointError naming it, rather than read as garbage.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..atomic import replacing_folder
from ..errors import CheckpointError
from ..quant import fp8, fp8_mm, hf_quantized, weight_only as wo
from . import hf
from .base import Checkpoint
from .hf import QUANT_METHOD as METHOD, check_method, load_safetensors
from .names import rename
from .transforms import unpermute_from_hf

WEIGHTS = "llamaherd-quantized/weights.safetensors"
_QUANT_SUFFIXES = (".qweight", ".scales", ".zeros")


def _quantized_modules(net: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in net.named_modules() if isinstance(m, (wo.Int8Linear, wo.Int4Linear))}


def save(model, dst: str | Path) -> Path:
    """Write a model loaded with `quantize=` so that `llamaherd.load(dst)` runs the very same codes."""
    dst = Path(dst)
    if dst.exists():
        raise CheckpointError(dst, "already exists; remove it or choose another output folder")
    mods = _quantized_modules(model.net)
    if not mods:
        raise wo.QuantizeError("this model holds no weight-only quantized modules; load it with quantize='int4'")
    kinds = {(type(m), getattr(m, "group_size", None)) for m in mods.values()}
    if len(kinds) != 1:
        raise wo.QuantizeError("the model mixes quantization schemes; save supports one scheme per model")
    cls, group = kinds.pop()
    scheme = "int8" if cls is wo.Int8Linear else "int4"
    state = model.net.state_dict()
    quantized = {k: t.contiguous() for k, t in state.items() if k.rsplit(".", 1)[0] in mods}
    plain = {k: t for k, t in state.items() if k not in quantized}

    with replacing_folder(dst) as tmp:  # staged, every file fsynced, renamed into place (atomic.py)
        hf.write(dataclasses.replace(model.checkpoint, state_dict=plain), tmp)
        (tmp / WEIGHTS).parent.mkdir()
        save_file(quantized, tmp / WEIGHTS, metadata={"format": "pt", "scheme": scheme})
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["quantization_config"] = {"quant_method": METHOD, "scheme": scheme, "group_size": group,
                                      "weights": WEIGHTS}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return dst


def save_fp8(model, dst: str | Path) -> Path:
    """Write a model loaded with `quantize="fp8"` as a compressed-tensors FP8 folder: e4m3 `weight` codes with
    per-channel `weight_scale` (and a static `input_scale` where the model has one), the layout of llm-compressor's
    FP8_DYNAMIC / FP8 schemes that vLLM, transformers (with compressed-tensors) and `llamaherd.load` read."""
    dst = Path(dst)
    if dst.exists():
        raise CheckpointError(dst, "already exists; remove it or choose another output folder")
    if any(isinstance(m, fp8_mm.Fp8Experts) for m in model.net.modules()):
        raise wo.QuantizeError("FP8 mixture-of-experts stacks have no compressed-tensors layout here; save the "
                               "Llama 4 model in bf16 and quantize it with llm-compressor")
    mods = {n: m for n, m in model.net.named_modules() if isinstance(m, fp8_mm.Fp8Linear)}
    if not mods:
        raise wo.QuantizeError("this model holds no FP8 projections; load it with quantize='fp8'")
    static = {m.input_scale is not None for m in mods.values()}
    if len(static) > 1 or any(m.scale_ub is not None for m in mods.values()):
        raise wo.QuantizeError("compressed-tensors states one activation scheme for all projections, without an "
                               "amax bound; this model's FP8 projections differ (an fbgemm or Meta FP8 source)")
    static_inputs = static.pop()
    ckpt, family = model.checkpoint, hf.FAMILIES[model.checkpoint.config.arch]

    def hf_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # Meta -> HF, wq/wk rows permuted
        return family.meta_to_hf(tensors, ckpt.config, source=ckpt.source)

    sd = {**model.net.state_dict(), **{f"{n}.weight": m.weight for n, m in mods.items()}}
    extra = {k.removesuffix("weight") + "weight_scale": t.contiguous()
             for k, t in hf_names({f"{n}.weight": m.weight_scale.reshape(-1, 1) for n, m in mods.items()}).items()}
    if static_inputs:
        extra.update({k.removesuffix("weight") + "input_scale": m.input_scale.reshape(1) for k, m in
                      zip(hf_names({f"{n}.weight": m.weight for n, m in mods.items()}), mods.values())})
    floats = [n for n, m in model.net.named_modules() if type(m) is nn.Linear and n.split(".")[-1] != "output"]
    ignore = ["lm_head", *(k.removesuffix(".weight") for k in hf_names({f"{n}.weight": model.net.get_submodule(n).weight
                                                                          for n in floats}))]
    with replacing_folder(dst) as tmp:  # staged, every file fsynced, renamed into place (atomic.py)
        hf.write(dataclasses.replace(ckpt, state_dict=sd), tmp, extra=extra)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["quantization_config"] = fp8_mm.compressed_tensors_config(static_inputs, ignore)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return dst


# -- reading --------------------------------------------------------------------------------------------------


def read(path: str | Path) -> Checkpoint:
    """A Hugging Face folder (the float part is an ordinary one), with weight-only codes where config.json says."""
    ckpt = hf.read(path)
    qc = ckpt.metadata["config"].get("quantization_config")
    if qc is None or fp8.reads(qc):  # FP8 weights: already dequantised by hf.read
        return ckpt
    if hf_quantized.reads(qc):
        return attach_packed(ckpt, qc, Path(path))
    return attach(ckpt, qc, Path(path))


def attach_packed(ckpt: Checkpoint, qc: dict, path: Path) -> Checkpoint:
    """A GPTQ / AWQ folder: each packed module becomes a `hf_quantized.PackedLinear` as the model is built."""
    cfile = path / "config.json"
    try:
        fmt = hf_quantized.parse(qc)
    except wo.QuantizeError as exc:
        raise CheckpointError(cfile, f"quantization_config: {exc}") from None
    if ckpt.config.arch != "llama":
        raise CheckpointError(cfile, f"{fmt.method.upper()} checkpoints are read for Llama models, not "
                              f"{ckpt.config.arch!r}; use the unquantized checkpoint")
    c, targets = ckpt.config, {}
    for hf_name, tensors in ckpt.metadata.get("packed", {}).items():
        meta = rename(hf_name + ".weight", hf.FAMILIES["llama"].HF_NAMES)
        if meta is None or meta == "output.weight":
            raise CheckpointError(path, f"holds a {fmt.method.upper()}-packed {hf_name!r}, which llamaherd does not "
                                  "run quantized; only the decoder layers' projections are supported")
        heads = c.n_heads if meta.endswith("attention.wq.weight") else \
            c.n_kv_heads if meta.endswith("attention.wk.weight") else None
        targets[meta.removesuffix(".weight")] = (hf_name, tensors, heads)

    def prepare(net: nn.Module) -> None:
        if ckpt.prepare is not None:
            ckpt.prepare(net)
        for name, (hf_name, tensors, heads) in targets.items():
            rows = None if heads is None else (lambda t, h=heads: unpermute_from_hf(t, h))
            try:
                new = hf_quantized.module(tensors, fmt, f"{path.name}: {hf_name}", rows)
            except wo.QuantizeError as exc:
                raise CheckpointError(path, str(exc)) from None
            parent, _, leaf = name.rpartition(".")
            old = getattr(net.get_submodule(parent), leaf, None)
            if not isinstance(old, nn.Linear) or (old.out_features, old.in_features) != (new.out_features,
                                                                                        new.in_features):
                raise CheckpointError(path, f"{hf_name} unpacks to ({new.out_features}, {new.in_features}), which "
                                      "the config.json's model does not have there; the folder is inconsistent")
            setattr(net.get_submodule(parent), leaf, new)

    return dataclasses.replace(ckpt, prepare=prepare, metadata={**ckpt.metadata, "quantization": fmt.method})


# Meta's Llama 4 FP8 loader quantizes the experts' activations per token with amax bounded by 1200
# (llama-models llama4/quantization/loader.py convert_to_quantized_model, fp8_activation_scale_ub).
META_FP8_ACTIVATION_UB = 1200.0
FP8_CODES = ("fp8_codes", "fp8_experts")  # what hf.read / meta_pth.read keep of an FP8 file's codes


def holds_fp8(ckpt: Checkpoint) -> bool:
    return any(ckpt.metadata.get(key) for key in FP8_CODES)


def keep_fp8(ckpt: Checkpoint) -> Checkpoint:
    """An FP8 checkpoint run on its own e4m3 codes by `torch._scaled_mm` (quant/fp8_mm.py): a Hugging Face folder's
    per-tensor / per-channel scaled projections as Fp8Linear, Meta's Llama 4 FP8 experts as Fp8Experts. The
    float copies the readers dequantised for them are dropped; anything else (block-scaled FP8, widths the
    kernels do not take) stays dequantised."""
    if ckpt.metadata.get("fp8_experts"):
        return _keep_meta_experts(ckpt)
    codes = {m: t for m, t in ckpt.metadata.get("fp8_codes", {}).items() if fp8_mm.fits(*t["weight"].shape)}
    if not codes:  # widths _scaled_mm does not take stay dequantised
        return ckpt
    family = hf.HF_MODEL_TYPES[ckpt.metadata["config"].get("model_type", "llama")]
    qc = ckpt.metadata["config"]["quantization_config"]
    # The family's own renaming (and Llama's wq/wk un-permutation) applied to the codes and to the per-row scales.
    weights = family.hf_to_meta({f"{m}.weight": t["weight"] for m, t in codes.items()}, ckpt.config, ckpt.source)
    rows = family.hf_to_meta({f"{m}.weight": t["weight_scale"].expand(t["weight"].shape[0], 1)
                              for m, t in codes.items()}, ckpt.config, ckpt.source)
    hf_names = dict(zip(weights, codes))
    ub = qc.get("activation_scale_ub")

    def prepare(net: nn.Module) -> None:
        if ckpt.prepare is not None:
            ckpt.prepare(net)
        for name, q in weights.items():
            tensors = codes[hf_names[name]]
            bound = tensors.get("input_scale_ub")
            module = name.removesuffix(".weight")
            try:
                new = fp8_mm.Fp8Linear(q, rows[name], input_scale=tensors.get("input_scale"),
                                       scale_ub=float(bound.reshape(-1)[0]) if bound is not None else ub,
                                       bias=ckpt.state_dict.get(f"{module}.bias"))
            except wo.QuantizeError as exc:
                raise CheckpointError(ckpt.source, f"{hf_names[name]}: {exc}") from None
            parent, _, leaf = module.rpartition(".")
            old = getattr(net.get_submodule(parent), leaf, None)
            if not isinstance(old, nn.Linear) or old.weight.shape != q.shape:
                raise CheckpointError(ckpt.source, f"{hf_names[name]} is {tuple(q.shape)}, which the config.json's "
                                      "model does not have there; the folder is inconsistent")
            setattr(net.get_submodule(parent), leaf, new)

    biases = {name.removesuffix("weight") + "bias" for name in weights}
    sd = {k: t for k, t in ckpt.state_dict.items() if k not in weights and k not in biases}
    return dataclasses.replace(ckpt, state_dict=sd, prepare=prepare,
                               metadata={**ckpt.metadata, "quantization": "fp8 (e4m3, torch._scaled_mm)"})


def _keep_meta_experts(ckpt: Checkpoint) -> Checkpoint:
    """Meta's FP8 Llama 4: each expert stack's codes per rank, the (E, in, out) stacks read as (E, out, in) banks.

    w1 / w3 are column-parallel (each rank holds whole rows of the output), so the ranks' rows join into one
    bank; w2 is row-parallel with scales of its own per rank, so its bank keeps one input slice per rank.
    """
    stacks: dict[str, dict[str, list]] = {}
    for name, ranks in ckpt.metadata["fp8_experts"].items():
        module, _, leaf = name.rpartition(".")
        stacks.setdefault(module, {})[leaf] = [(q.transpose(1, 2), s) for q, s in ranks]
    try:
        banks = {}
        for module, leaves in stacks.items():
            if set(leaves) != {"moe_w_in_eD_F", "moe_w_swiglu_eD_F", "moe_w_out_eF_D"}:
                raise wo.QuantizeError(f"{module} has FP8 scales for {sorted(leaves)} only")
            joined = [[(torch.cat([q for q, _ in leaves[leaf]], 1), torch.cat([s for _, s in leaves[leaf]], 1))]
                      for leaf in ("moe_w_in_eD_F", "moe_w_swiglu_eD_F")]
            banks[module] = fp8_mm.Fp8Experts(*(fp8_mm.Fp8Bank(b, META_FP8_ACTIVATION_UB)
                                                for b in (*joined, leaves["moe_w_out_eF_D"])))
    except wo.QuantizeError as exc:
        raise CheckpointError(ckpt.source, f"Meta FP8 experts: {exc}") from None

    def prepare(net: nn.Module) -> None:
        if ckpt.prepare is not None:
            ckpt.prepare(net)
        for module, bank in banks.items():
            parent, _, leaf = module.rpartition(".")
            setattr(net.get_submodule(parent), leaf, bank)

    gone = {f"{module}.{leaf}" for module, leaves in stacks.items() for leaf in leaves}
    sd = {k: t for k, t in ckpt.state_dict.items() if k not in gone}
    return dataclasses.replace(ckpt, state_dict=sd, prepare=prepare,
                               metadata={**ckpt.metadata, "quantization": "fp8 experts (e4m3, torch._scaled_mm)"})


def attach(ckpt: Checkpoint, qc: Any, path: Path) -> Checkpoint:
    """The checkpoint `hf.read` made of the float tensors, completed with the quantized codes of `qc`."""
    cfile = path / "config.json"
    check_method(qc, cfile)
    scheme, group = qc.get("scheme"), qc.get("group_size")
    spec = "int8" if scheme == "int8" else f"int4-g{group}"
    try:
        wo.parse_scheme(spec)
    except wo.QuantizeError as exc:
        raise CheckpointError(cfile, f"quantization_config: {exc}") from None
    weights = path / str(qc.get("weights", WEIGHTS))
    if not weights.is_file() or path.resolve() not in weights.resolve().parents:
        raise CheckpointError(weights, "the quantized weights named by config.json are missing; copy the whole folder")
    codes = load_safetensors(weights)
    shapes: dict[str, tuple[int, int]] = {}
    for key, t in codes.items():
        module, _, leaf = key.rpartition(".")
        if "." + leaf not in _QUANT_SUFFIXES or t.dim() not in (1, 2):
            raise CheckpointError(weights, f"unexpected tensor {key!r}; the file is not one llamaherd wrote")
        if leaf == "qweight":
            n, k = t.shape[0], t.shape[1] * (1 if scheme == "int8" else 2)
            shapes[module] = (n, k)

    def prepare(net: nn.Module) -> None:
        if ckpt.prepare is not None:
            ckpt.prepare(net)
        for name, (n, k) in shapes.items():
            empty = wo.empty_module(scheme, group, n, k)
            if name == "project.linear":
                net.project = wo.QuantizedVocabProjection(empty)
                continue
            parent, _, leaf = name.rpartition(".")
            try:
                owner = net.get_submodule(parent) if parent else net
                getattr(owner, leaf)
            except AttributeError:
                raise CheckpointError(weights, f"holds {name!r}, which the {ckpt.config.arch} model lacks") from None
            setattr(owner, leaf, empty)
        wo.group_siblings(net)  # wq/wk/wv, w1/w3 in one native call, as `wo.quantize` leaves them

    sd = dict(ckpt.state_dict)
    sd.pop("output.weight", None) if ckpt.config.tie_embeddings else None
    sd.update(codes)
    return dataclasses.replace(ckpt, state_dict=sd, prepare=prepare,
                               metadata={**ckpt.metadata, "quantization": spec})


__all__ = ["attach", "attach_packed", "check_method", "holds_fp8", "keep_fp8", "save", "save_fp8"]
