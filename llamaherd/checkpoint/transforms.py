"""Tensor transforms between layouts: HF's rotate-half permutation of wq/wk, model-parallel shard merge/split."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError

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


# -- model-parallel shards -----------------------------------------------------------------------
# How fairscale's layers in Meta's reference split each weight over model-parallel ranks
# (llama-models llama3/model.py; fairscale nn/model_parallel/layers.py):
#   ColumnParallelLinear (wq, wk, wv, w1, w3, output): output features, dim 0
#   RowParallelLinear (wo, w2): input features, dim 1
#   VocabParallelEmbedding (Llama 3 tok_embeddings): vocabulary, dim 0
#   ParallelEmbedding (Llama 2's original tok_embeddings): embedding dim, dim 1
#   RMSNorm weights: replicated on every rank.
_COLUMN = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
           "feed_forward.w1.weight", "feed_forward.w3.weight")
_ROW = ("attention.wo.weight", "feed_forward.w2.weight")

# Buffers some Meta checkpoints carry that are not weights (Llama 2 ships `rope.freqs`).
META_IGNORED = ("rope.freqs",)


def shard_dim(name: str) -> int | None:
    """The dimension a model-parallel split cuts for this tensor; None when replicated.

    tok_embeddings is not decided here: Llama 2 and Llama 3 split it differently (see `embedding_shard_dim`).
    """
    if name == "output.weight" or name.endswith(_COLUMN):
        return 0
    if name.endswith(_ROW):
        return 1
    return None


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


def merge_shards(shards: list[dict[str, torch.Tensor]], dim: int, files: list[Path]) -> dict[str, torch.Tensor]:
    """Join model-parallel state dicts into one, exactly inverting fairscale's split.

    Every shard must hold the same names; replicated tensors must agree. `files` name the shards in errors.
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
        axis = shard_dim(name)
        if name == "tok_embeddings.weight":
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
            merged[name] = torch.cat(parts, dim=axis)
    return merged


def split_shards(
    state_dict: dict[str, torch.Tensor], n: int, *, embedding_dim: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Split one state dict into `n` model-parallel shards, the way fairscale's layers would hold them.

    `embedding_dim` picks the Llama 3 (0) or Llama 2 (1) embedding split. Each piece is made contiguous
    so torch.save writes only its own bytes (saving a view would write the whole parent storage).
    """
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for name, t in state_dict.items():
        axis = embedding_dim if name == "tok_embeddings.weight" else shard_dim(name)
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
