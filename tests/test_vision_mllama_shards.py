"""Llama 3.2 Vision Meta checkpoints split over model-parallel consolidated.NN.pth files (90B Vision ships 8).

The test's splitter does not use our rules: it reads how each tensor is cut off Meta's reference itself (llama-models
`llama3/multimodal/model.py`, built on the meta device): fairscale's ColumnParallelLinear cuts output features
(weight and bias, dim 0), RowParallelLinear input features (weight, dim 1; its bias is added after the all-reduce,
whole on every rank), VocabParallelEmbedding the vocabulary (dim 0); every other tensor is whole on every rank.
Rank r holds the r-th contiguous piece (fairscale `_initialize_affine_weight`, stride 1). The shards' shapes are
checked against the reference built as rank 0 of 2 (fairscale's own arithmetic), then merged by our reader.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from llamaherd.checkpoint.mllama import config_from_meta_params, merge_meta_shards
from llamaherd.config import ModelConfig, VisionConfig
from llamaherd.errors import CheckpointError
from llamaherd.model import build

from .vision_fixtures import import_torchvision, meta_params, redraw

pytest.importorskip("fairscale")

# Tiny: 8 query / 4 key-value heads and 4 vision heads, so 2 and 4 ranks can hold them.
CONFIG = ModelConfig(arch="mllama", dim=32, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=256, multiple_of=32,
                     rope_theta=500000.0, max_seq_len=256,
                     vision=VisionConfig(image_size=28, patch_size=14, max_num_tiles=4, width=32, n_layers=3,
                                         n_global_layers=2, n_heads=4, intermediate_layers=(1,),
                                         n_cross_attention_layers=2))
_BLOCK = re.compile(r"\.\d+\.")


def _kind(name: str) -> str:
    """A tensor's name with its block index dropped (`layers.3.attention.wq.weight` -> `layers.N.attention...`)."""
    return _BLOCK.sub(".N.", name)


def reference(world_size: int = 1, rank: int = 0, monkeypatch=None):
    """Meta's CrossAttentionTransformer as rank `rank` of `world_size`, for its module types and shapes only: built
    on the meta device, fairscale's layers (which allocate their pieces with `torch.Tensor(...)`, on the CPU, left
    uninitialised here) included, so it costs no memory."""
    import fairscale.nn.model_parallel.initialize as fs_init
    import fairscale.nn.model_parallel.layers as fs_layers

    import_torchvision()  # before Meta's model, which imports its image transform
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.multimodal import model as meta_model

    args = ModelArgs(**meta_params(), max_seq_len=64, max_batch_size=1)
    with monkeypatch.context() as m, torch.device("meta"):
        # model.py asks fs_init at call time; fairscale's layers imported the functions by name.
        m.setattr(fs_init, "get_model_parallel_world_size", lambda: world_size)
        m.setattr(fs_layers, "get_model_parallel_world_size", lambda: world_size)
        m.setattr(fs_layers, "get_model_parallel_rank", lambda: rank)
        m.setattr(fs_layers, "_initialize_affine_weight", lambda *a, **k: None)  # no values: shapes only
        return meta_model.CrossAttentionTransformer(args)


@pytest.fixture(scope="module")
def split_dims(meta_parallel):
    """{tensor kind: the dim Meta's model-parallel layers cut}, read off the reference's module types."""
    from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    with pytest.MonkeyPatch.context() as mp:
        ref = reference(1, 0, mp)
    dims = {}
    for name, module in ref.named_modules():
        if isinstance(module, ColumnParallelLinear):
            dims[_kind(f"{name}.weight")] = 0
            if module.bias is not None:
                dims[_kind(f"{name}.bias")] = 0
        elif isinstance(module, RowParallelLinear):
            dims[_kind(f"{name}.weight")] = 1
        elif isinstance(module, VocabParallelEmbedding):
            dims[_kind(f"{name}.weight")] = 0
    kinds = {_kind(k) for k in ref.state_dict()}
    return dims, kinds


def split(state_dict: dict[str, torch.Tensor], n: int, split_dims) -> list[dict[str, torch.Tensor]]:
    """What each of n ranks of Meta's reference holds of this state dict."""
    dims, kinds = split_dims
    shards = [{} for _ in range(n)]
    for name, t in state_dict.items():
        assert _kind(name) in kinds, name  # the test knows how Meta cuts every tensor it splits
        dim = dims.get(_kind(name))
        for r in range(n):
            shards[r][name] = t.clone() if dim is None else t.chunk(n, dim)[r].clone()
    return shards


@pytest.fixture(scope="module")
def ours():
    torch.manual_seed(0)
    return redraw(build(CONFIG), seed=2)


def _files(n: int) -> list[Path]:
    return [Path(f"consolidated.{i:02d}.pth") for i in range(n)]


def test_the_splitter_makes_the_reference_ranks_shapes(split_dims, monkeypatch):
    """A model of the reference's own configuration, split by the test: rank 0's piece of every tensor has the
    shape Meta's reference has as rank 0 of 2 (the grid tables, whole on every rank, differ only in layout)."""
    config = config_from_meta_params(meta_params())
    full = build(config, device="meta").state_dict()
    shard = split(full, 2, split_dims)[0]
    want = reference(2, 0, monkeypatch).state_dict()
    layout_only = {"pre_tile_pos_embed.embedding", "post_tile_pos_embed.embedding", "gated_positional_embedding"}
    for name, t in shard.items():
        if not any(name.endswith(k) for k in layout_only):
            assert tuple(t.shape) == tuple(want[name].shape), name
    assert shard["vision_model.vision_encoder.transformer.resblocks.0.mlp.c_fc.bias"].shape[0] * 2 == \
        full["vision_model.vision_encoder.transformer.resblocks.0.mlp.c_fc.bias"].shape[0]


@pytest.mark.parametrize("n", [2, 4])
def test_shards_merge_back_bit_identical(ours, split_dims, n):
    want = ours.state_dict()
    merged = merge_meta_shards(split(want, n, split_dims), CONFIG, _files(n))
    assert set(merged) == set(want)
    for name, t in want.items():
        assert torch.equal(merged[name], t), name


def test_half_of_the_shards_is_refused(ours, split_dims):
    shards = split(ours.state_dict(), 4, split_dims)[:2]
    with pytest.raises(CheckpointError, match="another number of shards"):
        merge_meta_shards(shards, CONFIG, _files(2))


def test_a_differing_replicated_tensor_names_the_file(ours, split_dims):
    shards = split(ours.state_dict(), 2, split_dims)
    shards[1]["text_model.cross_attention_layers.0.attention.q_norm.weight"][0] += 1.0
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth.*q_norm.*differs"):
        merge_meta_shards(shards, CONFIG, _files(2))


def test_a_shard_count_not_dividing_the_heads_is_refused(ours, split_dims):
    shards = split(ours.state_dict(), 1, split_dims) * 3
    with pytest.raises(CheckpointError, match="3 shards cannot split"):
        merge_meta_shards(shards, CONFIG, _files(3))


def test_a_sharded_folder_goes_through_the_merge(ours, split_dims, tmp_path):
    """llamaherd's reader sends a folder of consolidated.NN.pth files through the merge and its checks (here
    tiny shards beside a params.json that implies Meta's real encoder: the merged shapes are refused by name)."""
    import json

    from llamaherd.checkpoint import meta_pth

    for i, shard in enumerate(split(ours.state_dict(), 2, split_dims)):
        torch.save(shard, tmp_path / f"consolidated.{i:02d}.pth")
    (tmp_path / "params.json").write_text(json.dumps(meta_params()))
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth.*merges from 2 shards"):
        meta_pth.read(tmp_path)
