"""Write a checkpoint as GGUF (arch "llama", "gemma3" or "llama4") in F32, F16 or a llama.cpp quantization mix.

Metadata keys, tensor names and the per-tensor type choice follow llama.cpp: gguf-py `constants.py` (keys,
names), `convert_hf_to_gguf.py` (LlamaModel, Gemma3Model, Llama4Model: hyperparameters, Llama 3.1 `rope_freqs`,
vocabularies) and `src/llama-quant.cpp::llama_tensor_get_type` (which tensors get more bits). Names and
tensor transforms are the GGUF reader's, inverted (the family modules' GGUF_NAMES and to_gguf). A quantized
source (a GGUF file) is decoded tensor by tensor and quantized again, with one warning, as
`llama-quantize --allow-requantize` does.
"""

from __future__ import annotations

import logging
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import gguf
from gguf import GGMLQuantizationType as Q, LlamaFileType, TokenType

from ..atomic import replacing
from ..errors import CheckpointError
from ..tokenizer.gguf_vocab import byte_to_unicode
from ..quant.ggml import GGMLWeight
from ..quant.imatrix import IMatrix
from ..quant.quantize import WEIGHTED, block_shape, nbytes, quantize
from . import gemma3, llama, llama4
from .base import Checkpoint, as_float, warn_requantize
from .names import invert, rename

# --- file types ----------------------------------------------------------------------------------------------
# name -> (base tensor type, general.file_type)
FILE_TYPES: dict[str, tuple[Q, LlamaFileType]] = {
    "f32": (Q.F32, LlamaFileType.ALL_F32),
    "f16": (Q.F16, LlamaFileType.MOSTLY_F16),
    "q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q4_k_m": (Q.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
    "q5_k_m": (Q.Q5_K, LlamaFileType.MOSTLY_Q5_K_M),
    "q6_k": (Q.Q6_K, LlamaFileType.MOSTLY_Q6_K),
    "q3_k_s": (Q.Q3_K, LlamaFileType.MOSTLY_Q3_K_S),
    "q3_k_m": (Q.Q3_K, LlamaFileType.MOSTLY_Q3_K_M),
    "q3_k_l": (Q.Q3_K, LlamaFileType.MOSTLY_Q3_K_L),
    "iq4_xs": (Q.IQ4_XS, LlamaFileType.MOSTLY_IQ4_XS),
}

# When a row length is not a multiple of the chosen type's block, llama.cpp falls back to a type with
# 32-element blocks (llama-quant.cpp `tensor_type_fallback`), and to F16 when even that fails.
FALLBACK: dict[Q, Q] = {Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0, Q.IQ4_XS: Q.IQ4_NL}

# --- tensor names --------------------------------------------------------------------------------------------
FAMILIES = {"llama": llama, "gemma3": gemma3, "llama4": llama4}  # general.architecture -> GGUF_NAMES, to_gguf
log = logging.getLogger(__name__)


def gguf_name(meta_name: str, arch: str = "llama", source: Any = None) -> tuple[str, int | None]:
    """('blk.3.attn_v.weight', 3) for 'layers.3.attention.wv.weight': the reader's table read the other way."""
    table = invert(FAMILIES[arch].GGUF_NAMES)
    name = rename(meta_name, table)
    if name is None:
        raise CheckpointError(source, f"tensor {meta_name!r} has no GGUF name for arch {arch!r}; known: {sorted(table)}")
    layer = meta_name.split(".")[1] if meta_name.startswith("layers.") else None
    return name, None if layer is None else int(layer)


# --- the quantization mix ------------------------------------------------------------------------------------
def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama-quant.cpp `use_more_bits`: the first and last eighth of the layers, and every third between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], ftype: str, *, layer: int | None, n_layers: int, has_output: bool,
                n_expert: int = 0, n_gqa: int = 1, has_imatrix: bool = False) -> Q:
    """The GGML type llama.cpp's `llama_tensor_get_type` gives GGUF tensor `name` under file type `ftype`.

    Rules (llama.cpp src/llama-quant.cpp, for the file types offered here):
    - 1-D tensors (norms, rope_freqs) and MoE routers (ffn_gate_inp) stay F32; F32/F16 files use their type for
      every other tensor (3-D expert stacks are quantized row by row like matrices).
    - output.weight (token_embd.weight when the embeddings are tied) becomes Q6_K unless the base type is
      Q8_0, or Q8_0 when its row length is not a multiple of 256.
    - Q4_K_M / Q5_K_M: attn_v and ffn_down get Q6_K in the layers `use_more_bits` picks. Every tensor named
      ffn_down* counts (ffn_down_exps, ffn_down_shexp), by its block index.
    - Q3_K_M: attn_v Q5_K in layers 0-1 and Q4_K after, ffn_down Q5_K in the first 16th of the layers and Q4_K
      after, attn_output Q4_K. Q3_K_L: attn_v, ffn_down and attn_output Q5_K. Q3_K_S: Q3_K throughout.
    - IQ4_XS: attn_v Q5_K when 4 or more query heads share a KV head; ffn_down Q5_K in the first 8th of the
      layers unless an importance matrix is given.
    - 80-layer (70B) models: an attn_v left at Q3_K or Q4_K gets Q5_K (8 query heads share each value head).
    - 8-expert models: attn_v and attn_k get Q8_0, and attn_output Q5_K under Q3_K_S/M, Q4_K_M and IQ4_XS.
    - A row length the type's block does not divide falls back (FALLBACK: Q3_K->Q4_0, Q4_K->Q5_0, Q5_K->Q5_1,
      Q6_K->Q8_0, IQ4_XS->IQ4_NL), and to F16 when 32 does not divide it either.
    """
    base, _ = FILE_TYPES[ftype]
    if len(shape) < 2 or ".ffn_gate_inp." in name:  # llama-quant.cpp tensor_allows_quantization; convert keeps F32
        return Q.F32
    if base in (Q.F32, Q.F16):
        return base
    qtype = base
    row = shape[-1]
    is_output = name == "output.weight" or (not has_output and name == "token_embd.weight")
    if is_output:
        if row % 256:
            qtype = Q.Q8_0
        elif base != Q.Q8_0:
            qtype = Q.Q6_K
    elif ".attn_v." in name or ".ffn_down" in name:
        assert layer is not None
        if ftype in ("q4_k_m", "q5_k_m") and use_more_bits(layer, n_layers):
            qtype = Q.Q6_K
        elif ftype == "q3_k_m":
            first = layer < 2 if ".attn_v." in name else layer < n_layers // 16
            qtype = Q.Q5_K if first else Q.Q4_K
        elif ftype == "q3_k_l":
            qtype = Q.Q5_K
        elif ftype == "iq4_xs" and (n_gqa >= 4 if ".attn_v." in name else layer < n_layers // 8 and not has_imatrix):
            qtype = Q.Q5_K
        if ".attn_v." in name and n_layers == 80 and qtype in (Q.Q3_K, Q.Q4_K):
            qtype = Q.Q5_K
    elif ".attn_output." in name and n_expert != 8 and ftype in ("q3_k_m", "q3_k_l"):
        qtype = Q.Q4_K if ftype == "q3_k_m" else Q.Q5_K
    if n_expert == 8 and (".attn_v." in name or ".attn_k." in name):
        qtype = Q.Q8_0
    elif n_expert == 8 and ".attn_output." in name and ftype in ("q3_k_s", "q3_k_m", "q4_k_m", "iq4_xs"):
        qtype = Q.Q5_K
    if row % block_shape(qtype)[0]:
        qtype = FALLBACK.get(qtype, Q.F16)
        if row % block_shape(qtype)[0]:
            qtype = Q.F16
    return qtype


# --- vocabulary ----------------------------------------------------------------------------------------------
def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list equivalent to tiktoken ranks, in the order GGUF's "gpt2" model applies merges.

    tiktoken joins whichever adjacent pair forms the lowest-ranked token, so every split of a token into
    two tokens is a merge, ranked by the token it forms (ties by the ranks of its parts). This is the
    list Meta's Llama 3 tokenizer.json carries; a merge list with one split per token would miss joins
    that tiktoken makes when pieces arrive by a different history.
    """
    keyed: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            rl, rr = ranks.get(left), ranks.get(right)
            if rl is not None and rr is not None:
                keyed.append((rank, rl, rr, left, right))
    keyed.sort()
    return [(a, b) for *_, a, b in keyed]


def _vocab_byte_level(tok: Any, vocab_size: int) -> dict[str, Any]:
    u = byte_to_unicode()
    spell = lambda b: "".join(u[c] for c in b)  # noqa: E731
    specials = {i: s for s, i in tok.special_tokens.items()}
    ranks = {tok.token_bytes(i): i for i in range(tok.vocab_size) if i not in specials}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in specials:
            tokens.append(specials[i])
            types.append(TokenType.CONTROL)
        elif i < tok.vocab_size:
            tokens.append(spell(tok.token_bytes(i)))
            types.append(TokenType.NORMAL)
        else:  # the model's embedding is wider than the tokenizer (convert_hf_to_gguf pads the same way)
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    merges = [f"{spell(a)} {spell(b)}" for a, b in bpe_merges(ranks)]
    # "llama-bpe" / "llama4" name Llama 3's / Llama 4's pre-tokenizer regex in llama.cpp (convert_hf_to_gguf
    # get_vocab_base_pre)
    pre = "llama4" if getattr(tok, "family", None) == "llama4" else "llama-bpe"
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "types": types, "merges": merges}


def _vocab_sentencepiece(tok: Any, vocab_size: int) -> dict[str, Any]:
    import sentencepiece

    if tok.source is None or not Path(tok.source).is_file():
        raise CheckpointError(tok.source, "the SentencePiece tokenizer's .model file is needed to write its scores to GGUF")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tok.source))
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        if i >= sp.get_piece_size():
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(TokenType.UNUSED)
            continue
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        # token kinds as convert_hf_to_gguf `_create_vocab_sentencepiece` assigns them
        types.append(
            TokenType.UNKNOWN if sp.is_unknown(i) else TokenType.CONTROL if sp.is_control(i)
            else TokenType.UNUSED if sp.is_unused(i) else TokenType.BYTE if sp.is_byte(i) else TokenType.NORMAL
        )
    return {"model": "llama", "tokens": tokens, "scores": scores, "types": types,
            "unk": sp.unk_id() if sp.unk_id() >= 0 else None}


def _copy_gguf_vocab(w: gguf.GGUFWriter, tok: Any) -> None:
    """A vocabulary read from a GGUF file goes out verbatim: every tokenizer.* key with its stored type."""
    if tok.source is None or not Path(tok.source).is_file():
        raise CheckpointError(tok.source, "a GGUF vocabulary can only be carried over from its source .gguf file")
    reader = gguf.GGUFReader(tok.source)
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            vtype = field.types[0]
            sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY and len(field.types) > 1 else None
            w.add_key_value(key, field.contents(), vtype, sub)


def add_vocab(w: gguf.GGUFWriter, tok: Any, vocab_size: int) -> None:
    """tokenizer.ggml.* keys for a llamaherd Tokenizer."""
    if tok.vocab_size > vocab_size:
        raise CheckpointError(
            tok.source, f"the tokenizer has {tok.vocab_size} tokens but the model's embedding only {vocab_size}; "
            "the tokenizer belongs to another model: put the model's own tokenizer beside its weights"
        )
    if tok.kind == "gguf":
        _copy_gguf_vocab(w, tok)
        return
    if tok.kind in ("tiktoken", "hf"):
        v = _vocab_byte_level(tok, vocab_size)
    elif tok.kind == "sentencepiece":
        v = _vocab_sentencepiece(tok, vocab_size)
    else:
        raise CheckpointError(tok.source, f"cannot write a {tok.kind!r} tokenizer to GGUF; known: tiktoken, hf, sentencepiece")
    w.add_tokenizer_model(v["model"])
    if "pre" in v:
        w.add_tokenizer_pre(v["pre"])
    w.add_token_list(v["tokens"])
    w.add_token_types([int(t) for t in v["types"]])
    if "scores" in v:
        w.add_token_scores(v["scores"])
    if "merges" in v:
        w.add_token_merges(v["merges"])
    if tok.bos_id is not None:
        w.add_bos_token_id(tok.bos_id)
        w.add_add_bos_token(True)
    if tok.eos_id is not None:
        w.add_eos_token_id(tok.eos_id)
    w.add_add_eos_token(False)
    if v.get("unk") is not None:
        w.add_unk_token_id(v["unk"])
    eot = tok.special_tokens.get("<|eot_id|>", tok.special_tokens.get("<|eot|>"))  # Llama 3 / Llama 4
    if eot is not None:
        w.add_eot_token_id(eot)


# --- hyperparameters -----------------------------------------------------------------------------------------
def llama3_rope_factors(head_dim: int, theta: float, s: Any) -> np.ndarray:
    """Per-frequency divisors llama.cpp applies from `rope_freqs.weight` (convert_hf_to_gguf LlamaModel).

    Frequencies with short wavelengths keep factor 1, long ones `factor`, and the band between gets
    1 / ((1 - smooth) / factor + smooth): dividing by it equals Llama 3.1's smooth interpolation.
    """
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(s.factor)
        else:
            smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
            out.append(1.0 / ((1 - smooth) / s.factor + smooth))
    return np.asarray(out, dtype=np.float32)


def add_hparams(w: gguf.GGUFWriter, ckpt: Checkpoint, file_type: LlamaFileType, name: str) -> None:
    c = ckpt.config
    w.add_name(name)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.hidden_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_dimension_count(c.head_dim)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(int(file_type))
    if c.rope_scaling is not None and c.rope_scaling.kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(c.rope_scaling.factor)
    if c.arch == "gemma3":
        _add_gemma3_hparams(w, c)
    if c.arch == "llama4":
        _add_llama4_hparams(w, c)
    if file_type not in (LlamaFileType.ALL_F32, LlamaFileType.MOSTLY_F16):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_gemma3_hparams(w: gguf.GGUFWriter, c: Any) -> None:
    """Gemma 3 keys (convert_hf_to_gguf.py Gemma3Model); what llama.cpp hard-codes must match, not be written.

    llama.cpp `llama-model.cpp` (LLM_ARCH_GEMMA3) fixes the local rope base at 10000 and the query scale at
    1/sqrt(head_dim) (1/sqrt(dim / n_heads) for the 62-layer 27B); the reader assumes the same.
    """
    scale = c.dim // c.n_heads if c.n_layers == 62 else c.head_dim
    if (c.rope_local_theta or 10000.0) != 10000.0 or (c.query_pre_attn_scalar or c.head_dim) != scale:
        raise CheckpointError(None, f"GGUF cannot state this Gemma 3's local rope base {c.rope_local_theta} or query "
                              f"scale {c.query_pre_attn_scalar}; llama.cpp assumes 10000 and {scale}: write --to hf")
    if c.sliding_window is not None:
        w.add_sliding_window(c.sliding_window)
    if c.sliding_window_pattern and c.sliding_window_pattern != 6:  # llama.cpp assumes 6; our reader reads the key
        w.add_uint32(f"{w.arch}.attention.sliding_window_pattern", c.sliding_window_pattern)
    if c.final_logit_softcap is not None:
        w.add_float32(f"{w.arch}.final_logit_softcapping", c.final_logit_softcap)
    if c.attn_logit_softcap is not None:
        w.add_float32(f"{w.arch}.attn_logit_softcapping", c.attn_logit_softcap)


def _add_llama4_hparams(w: gguf.GGUFWriter, c: Any) -> None:
    """Llama 4 keys (convert_hf_to_gguf.py Llama4Model; read by llama.cpp src/models/llama4.cpp).

    Chunk size, NoPE interval and temperature tuning are fixed by llama.cpp, not stated: `llama4.check_gguf`
    refuses a config they do not describe.
    """
    llama4.check_gguf(c)
    w.add_expert_count(c.moe.num_experts)
    w.add_expert_used_count(c.moe.top_k)
    w.add_expert_feed_forward_length(c.moe.hidden_dim)
    w.add_interleave_moe_layer_step(c.moe.interleave_step)


# --- the writer ----------------------------------------------------------------------------------------------
ProgressFn = Callable[[int, int, str, Q], None]


def plan(ckpt: Checkpoint, ftype: str, has_imatrix: bool = False) -> list[tuple[str, str | None, tuple[int, ...], Q]]:
    """(gguf name, meta name or None for rope_freqs, shape, type) for every tensor, in llama.cpp's order."""
    c = ckpt.config
    sd = ckpt.state_dict
    has_output = "output.weight" in sd
    n_expert = c.moe.num_experts if c.moe is not None else 0
    if c.arch == "llama4" and any(map(llama4.is_vision, sd)):
        log.warning("%s: the vision tower is not written: llama.cpp reads it from a separate mmproj GGUF "
                    "(convert_hf_to_gguf.py --mmproj); this file holds the text decoder", Path(ckpt.source).name)
    rows = []
    for meta_name, t in sd.items():
        if c.arch == "llama4" and llama4.is_vision(meta_name):
            continue
        if not (t.is_floating_point() or isinstance(t, GGMLWeight)):
            raise CheckpointError(ckpt.source, f"tensor {meta_name} is {t.dtype}, not a float or ggml tensor")
        name, layer = gguf_name(meta_name, c.arch, ckpt.source)
        shape = (t.shape[0], t.n_cols) if isinstance(t, GGMLWeight) else tuple(t.shape)
        if c.arch == "llama4" and llama4.gguf_transposed(meta_name):  # stored transposed (llama4.to_gguf)
            shape = (*shape[:-2], shape[-1], shape[-2])
        rows.append((name, meta_name, shape, tensor_type(name, shape, ftype, layer=layer, n_layers=c.n_layers,
                                                         has_output=has_output, n_expert=n_expert,
                                                         n_gqa=c.n_heads // c.n_kv_heads, has_imatrix=has_imatrix)))
    if c.rope_scaling is not None and c.rope_scaling.kind == "llama3":
        rows.append(("rope_freqs.weight", None, (c.head_dim // 2,), Q.F32))

    def order(row):  # token_embd, rope_freqs, blk.0..., output_norm, output
        name = row[0]
        m = re.match(r"blk\.(\d+)\.", name)
        head = {"token_embd.weight": 0, "rope_freqs.weight": 1, "output_norm.weight": 3, "output.weight": 4}
        return (head.get(name, 2), int(m.group(1)) if m else 0)

    return sorted(rows, key=order)


def write(
    ckpt: Checkpoint,
    dst: str | Path,
    *,
    qtype: str = "f16",
    dtype: str | None = None,
    name: str | None = None,
    progress: ProgressFn | None = None,
    imatrix: IMatrix | None = None,
    **options: Any,
) -> Path:
    """Write `ckpt` (arch "llama", "gemma3" or "llama4") to the GGUF file `dst` with file type `qtype`.

    `qtype` is one of FILE_TYPES (f32, f16, q8_0, q4_0, q3_k_s/m/l, q4_k_m, q5_k_m, q6_k, iq4_xs); `dtype`
    ("f32"/"f16", from `herd convert --dtype`) is accepted as an alias when `qtype` is left at its default. Tensors are quantized and written
    one at a time, so memory holds one tensor's copy at most. `progress(i, n, name, type)` is called
    before each tensor. `imatrix` (quant/imatrix.py) weights the rounding error of each tensor it has an entry
    for, as `llama-quantize --imatrix` does.
    """
    if options:
        raise CheckpointError(dst, f"unknown GGUF writer options {sorted(options)}; "
                              "known: qtype, dtype, name, progress, imatrix")
    if dtype is not None and qtype == "f16":
        qtype = str(dtype).lower().replace("float", "f")
    qtype = qtype.lower()
    if qtype not in FILE_TYPES:
        raise CheckpointError(dst, f"unknown GGUF type {qtype!r}; known: {', '.join(FILE_TYPES)}")
    c = ckpt.config
    if c.arch not in FAMILIES:
        raise CheckpointError(ckpt.source, f"GGUF writing supports arch {', '.join(map(repr, FAMILIES))}, "
                              f"this checkpoint is {c.arch!r}")
    rows = plan(ckpt, qtype, has_imatrix=imatrix is not None)
    warn_requantize(ckpt, f"{qtype} GGUF output")
    dst = Path(dst)
    with replacing(dst) as tmp:  # a killed or failed write leaves no truncated GGUF behind
        _write_file(ckpt, tmp, rows, qtype, name, progress, imatrix)
    return dst


def _write_file(ckpt: Checkpoint, dst: Path, rows: list, qtype: str, name: str | None,
                progress: ProgressFn | None, imatrix: IMatrix | None = None) -> None:
    c = ckpt.config
    w = gguf.GGUFWriter(dst, c.arch)
    add_hparams(w, ckpt, FILE_TYPES[qtype][1], name or ckpt.metadata.get("name") or Path(ckpt.source).name)
    if ckpt.tokenizer is not None:
        add_vocab(w, ckpt.tokenizer, c.vocab_size)
    else:  # llama.cpp runs such a file on token ids (LLAMA_VOCAB_TYPE_NONE; it needs the key, and vocab_size)
        w.add_tokenizer_model("none")
    if ckpt.chat_template and not (ckpt.tokenizer is not None and ckpt.tokenizer.kind == "gguf"):
        w.add_chat_template(ckpt.chat_template)
    if imatrix is not None:  # llama-quantize's record of the imatrix used (llama.cpp LLM_KV_QUANTIZE_IMATRIX_*)
        w.add_uint32("quantize.imatrix.entries_count", len(imatrix.entries))
        w.add_uint32("quantize.imatrix.chunks_count", imatrix.chunks)
        if imatrix.datasets:
            w.add_string("quantize.imatrix.dataset", imatrix.datasets[-1])
    for gname, _, shape, t in rows:
        # Tensor info takes the logical (row-major, torch-order) shape; the writer reverses it to ne[].
        w.add_tensor_info(gname, shape, np.dtype(np.float32), nbytes(t, shape), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    try:
        for i, (gname, meta_name, shape, t) in enumerate(rows):
            if progress is not None:
                progress(i, len(rows), gname, t)
            if meta_name is None:
                data = llama3_rope_factors(c.head_dim, c.rope_theta, c.rope_scaling)
            else:
                tensor = FAMILIES[c.arch].to_gguf(meta_name, as_float(ckpt.state_dict[meta_name]))
                importance = None
                if imatrix is not None and t in WEIGHTED:
                    importance = imatrix.weights(gname, math.prod(shape[:-2]), shape[-1])
                data, _ = quantize(tensor.to(torch.float32), t, importance)
            w.write_tensor_data(np.ascontiguousarray(data))
    finally:
        w.close()


def print_progress(i: int, n: int, name: str, t: Q) -> None:
    """A one-line progress indicator for the CLI, rewritten in place."""
    end = "\n" if i == n - 1 else ""
    sys.stderr.write(f"\r[{i + 1:>4}/{n}] {name:<32} {t.name:<5}" + end)
    sys.stderr.flush()
