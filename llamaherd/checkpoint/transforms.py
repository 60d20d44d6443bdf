"""Tensor transforms between layouts: HF's rotate-half permutation of wq/wk, model-parallel shard merge/split."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import CheckpointError
from .names import rename

# -- RoPE layout ---------------------------------------------------------------------------------
# Meta rotates adjacent pairs (x[2i], x[2i+1]); HF's LlamaAttention rotates halves (x[i], x[i + D/2]).
# HF checkpoints therefore store the rows of each head of wq/wk reordered so that rotate-half on them
# equals Meta's interleaved rotation on the original rows.


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta wq/wk (n_heads*head_dim, dim) -> HF rotate-half row order.

    Per head, rows [0,1,2,3,...] (pairs interleaved) become [0,2,4,...,1,3,5,...].
    Source: transformers `models/llama/convert_llama_weights_to_hf.py::permute`.
    """
    rows, cols = w.shape
    # (n_heads, head_dim/2, 2, dim) -> swap the pair axis ahead of the pair index -> (n_heads, 2, head_dim/2, dim)
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF wq/wk -> Meta's interleaved row order; the inverse of `permute_to_hf`.

    Source: llama2.c `export.py::permute_reverse`.
    """
    rows, cols = w.shape
    # (n_heads, 2, head_dim/2, dim) -> (n_heads, head_dim/2, 2, dim)
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


# -- tied embeddings and renaming ----------------------------------------------------------------


def drop_tied_output(state_dict: dict[str, torch.Tensor], tied: bool, source: object) -> dict[str, torch.Tensor]:
    """With tied embeddings, drop the output projection some checkpoints still save; it must be the embedding."""
    if tied:
        out = state_dict.pop("output.weight", None)
        if out is not None and not torch.equal(out, state_dict.get("tok_embeddings.weight", out.new_empty(0))):
            raise CheckpointError(source, "tie_word_embeddings is true but lm_head.weight differs from embed_tokens; "
                                  "set tie_word_embeddings false in config.json")
    return state_dict


def renamed(state_dict: dict[str, torch.Tensor], table: dict[str, str], tied: bool, source: object,
            model: str) -> dict[str, torch.Tensor]:
    """Canonical tensors under `table`'s names, leaving out a tied output projection; unknown names raise."""
    out = {}
    for name, t in state_dict.items():
        if name == "output.weight" and tied:
            continue
        target = rename(name, table)
        if target is None:
            raise CheckpointError(source, f"tensor {name!r} is not part of {model}; known: {sorted(table)}")
        out[target] = t
    return out


# -- model-parallel shards -----------------------------------------------------------------------
# How fairscale's layers in Meta's reference split each weight over model-parallel ranks
# (llama-models llama3/model.py, llama4/model.py, llama4/moe.py, llama4/ffn.py; fairscale nn/model_parallel/layers.py):
#   ColumnParallelLinear (wq, wk, wv, w1, w3, output): output features, dim 0 of the (out, in) weight
#   RowParallelLinear (wo, w2): input features, dim 1
#   VocabParallelEmbedding (Llama 3 and 4 tok_embeddings): vocabulary, dim 0
#   ParallelEmbedding (Llama 2's original tok_embeddings): embedding dim, dim 1
#   RMSNorm weights, Llama 4's router_DE: replicated on every rank.
# Rank r holds the r-th of n equal contiguous pieces: fairscale `_initialize_affine_weight` splits the master
# weight into per-partition chunks and gives rank r chunks[r::world_size] (stride 1: just chunks[r]).
# Llama 4's MoE (llama4/moe.py) keeps all E experts on every rank and divides each expert's hidden width F
# by the world size (`Experts.__init__`: divide_exact(hidden_dim, world_size)); the partial outputs are summed
# by reduce_from_model_parallel_region, so F is cut like w1/w3's rows and w2's columns: (E, D, F) on dim 2,
# (E, F, D) on dim 1. The shared expert is a FeedForward (w1/w3 column-, w2 row-parallel) of the same F.
_LLAMA_SPLITS: dict[str, int] = {
    "attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0, "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0, "feed_forward.w2.weight": 1,
    "output.weight": 0,
}
_LLAMA4_SPLITS: dict[str, int] = {
    **_LLAMA_SPLITS,
    "tok_embeddings.weight": 0,  # llama4/model.py builds a VocabParallelEmbedding
    "feed_forward.shared_expert.w1.weight": 0, "feed_forward.shared_expert.w3.weight": 0,
    "feed_forward.shared_expert.w2.weight": 1,
    "feed_forward.experts.moe_w_in_eD_F": 2, "feed_forward.experts.moe_w_swiglu_eD_F": 2,
    "feed_forward.experts.moe_w_out_eF_D": 1,
}
# Llama 3.2 Vision (llama-models llama3/multimodal/model.py, up to 8 ranks: past 8, Meta replicates heads):
# the text layers and the cross-attention blocks split like Llama 3 (q_norm / k_norm replicated); the
# vocabulary-parallel tok_embeddings and learnable_embedding (8 rows) on dim 0. In the vision encoder the patch
# projection (ColumnParallelConv2dPatch's `_linear`), attn wq/wk/wv and mlp c_fc (weight and bias) are
# column-parallel; attn wo and mlp c_proj's weight row-parallel (c_proj's bias is added after the all-reduce:
# replicated); vision_projection is column-parallel with its bias.
_MLLAMA_SPLITS: dict[str, int] = {
    **{k: v for k, v in _LLAMA_SPLITS.items() if k != "output.weight"},
    "text_model.tok_embeddings.weight": 0, "text_model.learnable_embedding.weight": 0, "text_model.output.weight": 0,
    "attn.wq.weight": 0, "attn.wk.weight": 0, "attn.wv.weight": 0, "attn.wo.weight": 1,
    "mlp.c_fc.weight": 0, "mlp.c_fc.bias": 0, "mlp.c_proj.weight": 1,
    "vision_model.vision_encoder.conv1._linear.weight": 0,
    "vision_model.vision_projection.weight": 0, "vision_model.vision_projection.bias": 0,
}
# arch (ModelConfig.arch) -> canonical name (without a block's `layers.N.` prefix) -> split dim. Names absent are
# replicated. Llama 1-3 leave tok_embeddings out: Llama 2 and 3 split it differently (see `embedding_shard_dim`).
SHARD_RULES: dict[str, dict[str, int]] = {"llama": _LLAMA_SPLITS, "llama4": _LLAMA4_SPLITS, "mllama": _MLLAMA_SPLITS}
_LAYER_PREFIX = re.compile(r"^(?:layers|text_model\.(?:layers|cross_attention_layers)"
                           r"|vision_model\.vision_encoder\.(?:global_)?transformer\.resblocks)\.\d+\.")

# Buffers some Meta checkpoints carry that are not weights (Llama 2 ships `rope.freqs`).
META_IGNORED = ("rope.freqs",)


def _rules(arch: str) -> dict[str, int]:
    try:
        return SHARD_RULES[arch]
    except KeyError:
        raise CheckpointError(
            None, f"no model-parallel shard rules for arch {arch!r}; known: {', '.join(SHARD_RULES)}"
        ) from None


def shard_dim(name: str, arch: str = "llama") -> int | None:
    """The dimension a model-parallel split cuts for this tensor; None when replicated.

    For arch "llama", tok_embeddings is not decided here: Llama 2 and Llama 3 split it differently
    (see `embedding_shard_dim`).
    """
    return _rules(arch).get(_LAYER_PREFIX.sub("", name))


def embedding_shard_dim(shard_shape: tuple[int, ...], n_shards: int, dim: int, source: Path) -> int:
    """0 (VocabParallelEmbedding, Llama 3) or 1 (ParallelEmbedding, Llama 2), read off the shard's width."""
    if n_shards == 1 or shard_shape[1] == dim:
        return 0
    if shard_shape[1] * n_shards == dim:
        return 1
    raise CheckpointError(
        source,
        f"tok_embeddings.weight shards have shape {tuple(shard_shape)}; with {n_shards} shards and dim {dim} "
        "(params.json) they split neither the vocabulary nor the embedding dim; check params.json matches the files",
    )


def merge_shards(
    shards: list[dict[str, torch.Tensor]], dim: int, files: list[Path], *, arch: str = "llama"
) -> dict[str, torch.Tensor]:
    """Join model-parallel state dicts into one, exactly inverting fairscale's split (rules: `SHARD_RULES[arch]`).

    Every shard must hold the same names; replicated tensors must agree and split ones have equal pieces.
    `files` name the shards in errors.
    """
    if len(shards) == 1:
        return dict(shards[0])
    names = set(shards[0])
    for f, sd in zip(files[1:], shards[1:]):
        if set(sd) != names:
            extra, missing = sorted(set(sd) - names), sorted(names - set(sd))
            raise CheckpointError(
                f,
                f"shard holds different tensors than {files[0].name}: extra {extra[:4]}, missing {missing[:4]}; "
                "all consolidated.*.pth files must come from the same checkpoint",
            )
    merged: dict[str, torch.Tensor] = {}
    for name in shards[0]:
        parts = [sd[name] for sd in shards]
        axis = shard_dim(name, arch)
        if name == "tok_embeddings.weight" and axis is None:
            axis = embedding_shard_dim(tuple(parts[0].shape), len(parts), dim, files[0])
        if axis is None:
            for f, p in zip(files[1:], parts[1:]):
                if p.shape != parts[0].shape or not torch.equal(p, parts[0]):
                    raise CheckpointError(
                        f, f"replicated tensor {name} differs from the copy in {files[0].name}; the shards do not "
                        "belong to one checkpoint (re-download the folder)",
                    )
            merged[name] = parts[0]
        else:
            for f, p in zip(files[1:], parts[1:]):
                if p.shape != parts[0].shape:
                    raise CheckpointError(
                        f, f"holds {name} as {tuple(p.shape)} but {files[0].name} as {tuple(parts[0].shape)}; "
                        "model-parallel pieces are equal, so the shards come from different checkpoints",
                    )
            merged[name] = torch.cat(parts, dim=axis)
    return merged


def split_shards(
    state_dict: dict[str, torch.Tensor], n: int, *, embedding_dim: int = 0, arch: str = "llama"
) -> list[dict[str, torch.Tensor]]:
    """Split one state dict into `n` model-parallel shards, the way fairscale's layers would hold them.

    `embedding_dim` picks the Llama 3 (0) or Llama 2 (1) embedding split for arch "llama"; Llama 4's rules fix
    it. Each piece is made contiguous so torch.save writes only its own bytes (saving a view would write the
    whole parent storage).
    """
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for name, t in state_dict.items():
        axis = shard_dim(name, arch)
        if axis is None and name == "tok_embeddings.weight":
            axis = embedding_dim
        if axis is None or n == 1:
            for sd in shards:
                sd[name] = t.contiguous() if n == 1 else t.clone()
            continue
        if t.shape[axis] % n:
            raise CheckpointError(
                None, f"cannot split {name} of shape {tuple(t.shape)} into {n} shards along dim {axis}; "
                f"choose a shard count dividing {t.shape[axis]}",
            )
        for sd, piece in zip(shards, torch.chunk(t, n, dim=axis)):
            sd[name] = piece.clone()
    return shards
