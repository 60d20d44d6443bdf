"""GGUF checkpoints: metadata -> ModelConfig, tensor names -> Meta names, tensors as views of the mapped file.

The container itself (header, metadata, tensor views) is `llamaherd.gguf_file`. Quantized tensors stay
packed (uint8 rows); `Checkpoint.prepare` swaps in `llamaherd.quant` modules for them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from ..config import GenerationDefaults, ModelConfig, RopeScaling
from ..errors import GGUFError, TokenizerError
from ..gguf_file import GGMLType, TensorInfo, open_gguf, tensor_view
from ..model.rope import inv_frequencies
from ..quant.ggml import GGMLWeight, swap_ggml
from ..quant.ggml_quants import dequantize
from ..tokenizer.gguf_vocab import from_metadata
from . import gemma3, llama, llama4
from .base import Checkpoint
from .names import rename

# ---- metadata -> ModelConfig ---------------------------------------------------------------------

# general.architecture -> the module with its GGUF_NAMES table and from_gguf tensor transform.
FAMILIES = {"llama": llama, "gemma3": gemma3, "llama4": llama4}


class _Meta:
    """Typed access to `{arch}.*` metadata with errors naming the key."""

    def __init__(self, md: dict[str, Any], arch: str, path: Path) -> None:
        self.md, self.arch, self.path = md, arch, path

    def get(self, key: str, kind: type, default: Any = ...) -> Any:
        full = f"{self.arch}.{key}" if not key.startswith(("general.", "tokenizer.")) else key
        if full not in self.md:
            if default is ...:
                raise GGUFError(self.path, f"metadata {full!r} is missing; the file was not written for llama.cpp's {self.arch!r} architecture")
            return default
        v = self.md[full]
        if isinstance(v, np.ndarray) and v.size and (v == v.flat[0]).all():
            v = v.flat[0].item()  # per-layer arrays (e.g. head_count_kv) that are uniform
        ok = isinstance(v, str) if kind is str else isinstance(v, (int, float)) and not isinstance(v, (bool, str))
        if not ok:
            raise GGUFError(self.path, f"metadata {full!r} = {v!r:.80} should be a {kind.__name__}; fix or re-convert the file")
        return kind(v)


def config_from_metadata(md: dict[str, Any], tensors: dict[str, TensorInfo], path: Path) -> ModelConfig:
    arch = md.get("general.architecture")
    if arch not in FAMILIES:
        raise GGUFError(path, f"general.architecture = {arch!r} is not supported by the GGUF reader; supported: "
                        f"{', '.join(map(repr, FAMILIES))}")
    m = _Meta(md, arch, path)
    if "token_embd.weight" not in tensors:
        raise GGUFError(path, "tensor 'token_embd.weight' is missing; the file holds no embedding table")
    vocab, dim = tensors["token_embd.weight"].shape
    if m.get("embedding_length", int) != dim:
        raise GGUFError(path, f"{arch}.embedding_length disagrees with token_embd.weight's width {dim}")
    n_heads = m.get("attention.head_count", int)
    head_dim = m.get("attention.key_length", int, None) or dim // max(n_heads, 1)
    rot = m.get("rope.dimension_count", int, head_dim)
    if rot != head_dim:
        raise GGUFError(path, f"{arch}.rope.dimension_count = {rot} but heads are {head_dim} wide; partial rotary is unsupported")
    fields = dict(
        arch=arch, dim=dim, n_layers=m.get("block_count", int), n_heads=n_heads,
        n_kv_heads=m.get("attention.head_count_kv", int, n_heads), vocab_size=vocab,
        hidden_dim=m.get("feed_forward_length", int), head_dim=head_dim,
        norm_eps=m.get("attention.layer_norm_rms_epsilon", float, 1e-5),
        rope_theta=m.get("rope.freq_base", float, 10000.0),
        max_seq_len=m.get("context_length", int, 4096),
        tie_embeddings="output.weight" not in tensors,
        rope_scaling=_rope_scaling(m, path),
    )
    if arch == "gemma3":
        # llama.cpp `llama-model.cpp` (LLM_ARCH_GEMMA3) hard-codes what the GGUF does not say: every 6th layer
        # is global, local layers use rope base 10000, queries scale by 1/sqrt(head_dim) except on 27B
        # (62 layers), which uses 1/sqrt(dim / n_heads).
        fields.update(
            sliding_window=m.get("attention.sliding_window", int, None),
            sliding_window_pattern=_int_or(md.get("gemma3.attention.sliding_window_pattern"), 6),
            rope_local_theta=10000.0,
            query_pre_attn_scalar=float(dim // n_heads if fields["n_layers"] == 62 else head_dim),
            final_logit_softcap=m.get("final_logit_softcapping", float, None),
            attn_logit_softcap=m.get("attn_logit_softcapping", float, None),
        )
    if arch == "llama4":  # experts, and what llama.cpp fixes rather than reads (checkpoint/llama4.py)
        fields.update(llama4.gguf_fields(m.get, path))
    for key in ("n_layers", "n_heads", "n_kv_heads", "hidden_dim", "head_dim", "max_seq_len"):
        if not 0 < fields[key] < 1 << 31:
            raise GGUFError(path, f"metadata gives {key} = {fields[key]}, which is not a usable size; fix the {arch}.* keys")
    blocks = {int(n.split(".")[1]) for n in tensors if n.startswith("blk.") and n.split(".")[1].isdigit()}
    if len(blocks) != fields["n_layers"] or (blocks and max(blocks) != len(blocks) - 1):
        raise GGUFError(path, f"{arch}.block_count = {fields['n_layers']} but the file holds tensors for "
                        f"{len(blocks)} blocks (indices {min(blocks, default=None)}..{max(blocks, default=None)})")
    try:
        return ModelConfig(**fields)
    except (ValueError, ZeroDivisionError) as e:
        raise GGUFError(path, f"metadata describes an impossible model: {e}") from e


def _int_or(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


def _rope_scaling(m: _Meta, path: Path) -> RopeScaling | None:
    kind = m.get("rope.scaling.type", str, "none")
    if kind == "none":
        return None
    if kind == "linear":
        return RopeScaling(kind="linear", factor=m.get("rope.scaling.factor", float))
    raise GGUFError(path, f"{m.arch}.rope.scaling.type = {kind!r} is unsupported; supported: 'none', 'linear' (+ rope_freqs tensor)")


def rope_scaling_from_factors(factors: torch.Tensor, head_dim: int, theta: float, path: Path) -> RopeScaling:
    """Recover Llama 3.1-style scaling from llama.cpp's `rope_freqs.weight` (per-frequency divisors).

    convert_hf_to_gguf.py (LlamaModel.generate_extra_tensors) writes 1 / scale per frequency instead of the
    rope_scaling parameters, so we search the parameter sets released models use and insist on a match.
    """
    factors = factors.float().flatten()
    base = inv_frequencies(head_dim, theta)
    if factors.shape != base.shape:
        raise GGUFError(path, f"rope_freqs.weight has {factors.numel()} entries, expected head_dim/2 = {base.numel()}")
    factor = float(factors.max())
    for original in (8192, 4096, 16384, 32768, 2048, 131072):
        # (1, 1): Llama 4 Scout (factor 16, original 8192), whose band between the two wavelengths is empty
        for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0), (1.0, 1.0)):
            s = RopeScaling(kind="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high, original_max_position=original)
            if torch.allclose(base / inv_frequencies(head_dim, theta, s), factors, rtol=1e-4, atol=1e-5):
                return s
    raise GGUFError(path, "rope_freqs.weight matches no Llama 3.1-style scaling (factor/low/high/original); unsupported rope scaling")


# ---- the reader ----------------------------------------------------------------------------------


def read(path: str | Path) -> Checkpoint:
    """Read a GGUF file into a Checkpoint: canonical names, mmap'd tensors, quantized weights kept packed."""
    path = Path(path)
    header, mm = open_gguf(path)
    config = config_from_metadata(header.metadata, header.tensors, path)
    family = FAMILIES[config.arch]
    state: dict[str, torch.Tensor] = {}
    qtypes: dict[str, GGMLType] = {}
    unknown = []
    for info in header.tensors.values():
        if info.name == "rope_freqs.weight" and config.arch in ("llama", "llama4"):
            t = tensor_view(mm, info)
            t = dequantize(t, info.type) if info.type.quantized else t
            config = config.replace(rope_scaling=rope_scaling_from_factors(t, config.head_dim, config.rope_theta, path))
            continue
        name = rename(info.name, family.GGUF_NAMES)
        if name is None:
            unknown.append(info.name)
            continue
        t = tensor_view(mm, info)
        if info.type.quantized and config.arch == "llama4" and (t.dim() != 2 or llama4.gguf_transposed(name)):
            # Llama 4's stacked experts (3-D) and router have no packed-weight module here: decoded on load.
            state[name] = family.from_gguf(name, dequantize(t, info.type))
            continue
        if info.type.quantized:
            if t.dim() != 2:
                raise GGUFError(path, f"quantized tensor {info.name!r} has shape {info.shape}; only 2-D quantized weights are supported")
            qtypes[name] = info.type
            t = GGMLWeight(t, info.type)
        else:
            t = family.from_gguf(name, t)
        state[name] = t
    if unknown:
        raise GGUFError(path, f"tensors {unknown[:6]} have no {config.arch} counterpart in llamaherd; the file is for another architecture")
    def prepare(net: torch.nn.Module) -> None:
        swap_ggml(net, qtypes)

    md = header.metadata
    tokenizer = None
    if "tokenizer.ggml.model" in md:
        try:
            tokenizer = from_metadata(md, path)
        except TokenizerError as e:
            raise GGUFError(path, f"tokenizer metadata is unusable: {e}") from e
    return Checkpoint(
        config=config,
        state_dict=state,
        source=path,
        tokenizer=tokenizer,
        generation=_generation(md),
        chat_template=md.get("tokenizer.chat_template") if isinstance(md.get("tokenizer.chat_template"), str) else None,
        prepare=prepare if qtypes else None,
        metadata={
            "format": "gguf",
            "gguf_version": header.version,
            "quantized": {k: v.name for k, v in qtypes.items()},
            "file_type": _file_type(md.get("general.file_type")),
            "name": md.get("general.name") if isinstance(md.get("general.name"), str) else None,
            "gguf": {k: v for k, v in md.items() if not isinstance(v, (list, np.ndarray)) or len(v) <= 64},
            "_mmap": mm,  # keeps the mapping alive as long as the checkpoint
        },
    )


def _file_type(value: Any) -> str | None:
    """general.file_type (llama.cpp `llama_ftype`, e.g. 15) as its name ("Q4_K_M"), None when absent or unknown."""
    try:
        return gguf.LlamaFileType(int(value)).name.removeprefix("MOSTLY_")
    except (TypeError, ValueError):
        return None


def _generation(md: dict[str, Any]) -> GenerationDefaults:
    ids = [md[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
           if isinstance(md.get(k), int)]
    bos = md.get("tokenizer.ggml.bos_token_id")
    return GenerationDefaults(eos_token_ids=tuple(dict.fromkeys(ids)), bos_token_id=bos if isinstance(bos, int) else None)
