"""Llama 4 Meta checkpoints split over model-parallel consolidated.NN.pth files, against Meta's reference layers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llamaherd.checkpoint import meta_pth
from llamaherd.checkpoint.base import Checkpoint
from llamaherd.checkpoint.llama4 import config_from_params
from llamaherd.errors import CheckpointError
from llamaherd.model import build

from .conftest import random_model
from .test_llama4 import PARAMS as PARAMS_1_TO_2
from .test_llama4 import tokens

# test_llama4's tiny model (every Llama 4 feature) with 8 query / 4 key-value heads, so 4 ranks can hold them.
PARAMS = {**PARAMS_1_TO_2, "n_heads": 8, "n_kv_heads": 4}
CONFIG = config_from_params(PARAMS)

# Meta's reference names the stacked experts w1/w3/w2 in its modules; its load hook (llama4/moe.py
# Experts.load_hook) renames the checkpoint's moe_w_* onto them. Everything else keeps the checkpoint's name.
_REF_EXPERT_NAMES = {"moe_w_in_eD_F": "w1", "moe_w_swiglu_eD_F": "w3", "moe_w_out_eF_D": "w2"}


@pytest.fixture(scope="module")
def ours():
    return random_model(CONFIG, seed=0)


@pytest.fixture(scope="module")
def sharded(ours, tmp_path_factory):
    """The tiny model written unsharded, as 2 and as 4 shards: {n: folder}."""
    ckpt = Checkpoint(config=CONFIG, state_dict=ours.state_dict(), source=Path("random"))
    root = tmp_path_factory.mktemp("llama4_shards")
    return {n: meta_pth.write(ckpt, root / f"mp{n}", shards=n) for n in (1, 2, 4)}


def reference_rank(world_size: int, rank: int, monkeypatch) -> torch.nn.Module:
    """Meta's llama4 Transformer as rank `rank` of `world_size` would build it (fairscale's own split arithmetic)."""
    import fairscale.nn.model_parallel.initialize as fs_init
    import fairscale.nn.model_parallel.layers as fs_layers
    from llama_models.llama4.args import ModelArgs, MoEArgs
    from llama_models.llama4.model import Transformer as MetaTransformer

    args = ModelArgs(**{**PARAMS, "moe_args": MoEArgs(**PARAMS["moe_args"]), "max_batch_size": 2})
    with monkeypatch.context() as m:
        # model.py / moe.py ask fs_init at call time; fairscale's layers imported the functions by name.
        m.setattr(fs_init, "get_model_parallel_world_size", lambda: world_size)
        m.setattr(fs_layers, "get_model_parallel_world_size", lambda: world_size)
        m.setattr(fs_layers, "get_model_parallel_rank", lambda: rank)
        m.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)  # its KV cache is allocated with .cuda()
        ref = MetaTransformer(args)
    return ref.eval()


def parallel_logits(ranks: list[torch.nn.Module], toks: torch.Tensor) -> torch.Tensor:
    """Meta's forward (llama4/model.py Transformer.forward) run over all ranks in one process.

    Each all-reduce of fairscale (after the vocab-parallel embedding, row-parallel wo / w2, the MoE) is a sum
    over the ranks' partial outputs; the column-parallel output's gather is a concatenation. Replicated norms
    come from rank 0. Every product is computed by the reference's own modules holding their shard.
    """
    from llama_models.llama4.model import create_chunked_attention_mask

    r0 = ranks[0]
    seq = toks.shape[1]
    freqs = r0.freqs_cis[:seq]
    global_mask = torch.triu(torch.full((seq, seq), float("-inf")), diagonal=1)
    local_mask = create_chunked_attention_mask(seq, PARAMS["attention_chunk_size"], toks.device)
    with torch.inference_mode():
        h = sum(r.tok_embeddings(toks) for r in ranks)
        for i, layer in enumerate(r0.layers):
            mask = global_mask if layer.is_nope_layer else local_mask
            x = layer.attention_norm(h)
            h = h + sum(r.layers[i].attention(x, 0, freqs, mask) for r in ranks)
            x = layer.ffn_norm(h)
            h = h + sum(r.layers[i].feed_forward(x) for r in ranks)
        h = r0.norm(h)
        return torch.cat([r.output(h).float() for r in ranks], dim=-1)  # (B, T, vocab)


def ref_name(name: str) -> str:
    prefix, _, leaf = name.rpartition(".")
    return f"{prefix}.{_REF_EXPERT_NAMES[leaf]}" if leaf in _REF_EXPERT_NAMES else name


# -- writing: each shard is what the reference's rank holds ----------------------------------------------------
@pytest.mark.parametrize("n", [2, 4])
def test_shards_have_the_reference_rank_shapes(sharded, monkeypatch, n):
    files = sorted(sharded[n].glob("consolidated.*.pth"))
    assert [f.name for f in files] == [f"consolidated.{i:02d}.pth" for i in range(n)]
    want = {k: tuple(v.shape) for k, v in reference_rank(n, 0, monkeypatch).state_dict().items()}
    for f in files:
        shard = meta_pth.load_pth(f)
        got = {ref_name(k): tuple(v.shape) for k, v in shard.items()}
        assert got == want, f.name
    # Experts are split along F (Experts.__init__ divides hidden_dim by the world size), not over experts.
    assert got["layers.1.feed_forward.experts.w1"] == (4, 64, 128 // n)
    assert got["layers.1.feed_forward.experts.w2"] == (4, 128 // n, 64)


@pytest.mark.parametrize("n", [2, 4])
def test_reference_ranks_loaded_with_our_shards_give_the_unsharded_logits(ours, sharded, meta_parallel,
                                                                          monkeypatch, n):
    ranks = []
    for i in range(n):
        ref = reference_rank(n, i, monkeypatch)
        # strict: the reference's own load hooks take every tensor of the shard at exactly its rank's shape
        ref.load_state_dict(meta_pth.load_pth(sharded[n] / f"consolidated.{i:02d}.pth"), strict=True)
        ranks.append(ref)
    toks = tokens()
    with torch.no_grad():
        want = ours(toks)
    torch.testing.assert_close(parallel_logits(ranks, toks), want, atol=1e-4, rtol=1e-4)


# -- reading: merged back bit-identical -----------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 4])
def test_sharded_folder_reads_back_identical(ours, sharded, n):
    params = json.loads((sharded[n] / "params.json").read_text())
    assert params == json.loads((sharded[1] / "params.json").read_text())
    ckpt = meta_pth.read(sharded[n])
    assert ckpt.config == CONFIG and ckpt.metadata["shards"] == n
    want = ours.state_dict()
    assert set(ckpt.state_dict) == set(want)
    for name, t in want.items():
        assert torch.equal(ckpt.state_dict[name], t), name
    net = build(ckpt.config)
    net.load_state_dict(ckpt.state_dict, strict=True)
    toks = tokens()
    with torch.no_grad():
        assert torch.equal(net(toks), ours(toks))


def test_flattened_expert_spelling_merges(ours, sharded, tmp_path):
    """Meta's files may store experts flattened, (E*D, F/n) and (E*F/n, D), under w1/w3/w2 (llama4/moe.py hook)."""
    E, D = CONFIG.moe.num_experts, CONFIG.dim
    for i in range(2):
        shard = meta_pth.load_pth(sharded[2] / f"consolidated.{i:02d}.pth")
        for name in list(shard):
            prefix, _, leaf = name.rpartition(".")
            if leaf in _REF_EXPERT_NAMES:
                t = shard.pop(name)
                shard[f"{prefix}.{_REF_EXPERT_NAMES[leaf]}"] = t.reshape(E * t.shape[1], t.shape[2])
        torch.save(shard, tmp_path / f"consolidated.{i:02d}.pth")
    (tmp_path / "params.json").write_text((sharded[2] / "params.json").read_text())
    sd = meta_pth.read(tmp_path).state_dict
    for name, t in ours.state_dict().items():
        assert torch.equal(sd[name], t), name


# -- shards that do not belong together -----------------------------------------------------------------------
def _copy(src: Path, dst: Path, n: int) -> None:
    dst.mkdir()
    for i in range(n):
        (dst / f"consolidated.{i:02d}.pth").write_bytes((src / f"consolidated.{i:02d}.pth").read_bytes())
    (dst / "params.json").write_text((src / "params.json").read_text())


def test_differing_replicated_router_names_the_file(sharded, tmp_path):
    _copy(sharded[2], tmp_path / "ck", 2)
    f = tmp_path / "ck" / "consolidated.01.pth"
    shard = meta_pth.load_pth(f)
    shard = {k: v.clone() for k, v in shard.items()}
    shard["layers.3.feed_forward.router_DE"][0, 0] += 1.0
    torch.save(shard, f)
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth.*router_DE.*differs"):
        meta_pth.read(tmp_path / "ck")


def test_missing_shards_are_refused(sharded, tmp_path):
    """Two files of a four-shard folder: every split tensor merges to half its width."""
    _copy(sharded[4], tmp_path / "ck", 2)
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth.*written as 4 shards.*holds 2"):
        meta_pth.read(tmp_path / "ck")


def test_shards_from_different_splits_are_refused(sharded, tmp_path):
    _copy(sharded[2], tmp_path / "ck", 2)
    (tmp_path / "ck" / "consolidated.01.pth").write_bytes((sharded[4] / "consolidated.01.pth").read_bytes())
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth"):
        meta_pth.read(tmp_path / "ck")


def test_shard_count_not_dividing_heads_is_refused(sharded, tmp_path):
    _copy(sharded[1], tmp_path / "ck", 1)
    for i in (1, 2):  # three files; 4 kv heads cannot be split three ways
        (tmp_path / "ck" / f"consolidated.{i:02d}.pth").write_bytes(
            (sharded[1] / "consolidated.00.pth").read_bytes())
    with pytest.raises(CheckpointError, match="3 shards cannot split"):
        meta_pth.read(tmp_path / "ck")


def test_writer_refuses_a_shard_count_not_dividing_the_model(ours, tmp_path):
    ckpt = Checkpoint(config=CONFIG, state_dict=ours.state_dict(), source=Path("random"))
    with pytest.raises(CheckpointError, match="--shards 3"):
        meta_pth.write(ckpt, tmp_path / "x", shards=3)


def test_params_json_reproduces_widths_of_a_config_read_from_hf():
    """A config.json states widths, not Meta's rule inputs; the writer finds inputs that give them back."""
    from llama_models.llama4.args import ModelArgs, MoEArgs
    from llama_models.llama4.model import TransformerBlock

    from llamaherd.checkpoint.llama4 import params_from_config

    hf_like = CONFIG.replace(multiple_of=256, ffn_dim_multiplier=None, hidden_dim=192,
                             moe=CONFIG.moe.__class__(num_experts=4, top_k=1, hidden_dim=96, interleave_step=2))
    params = params_from_config(hf_like)
    back = config_from_params(params)
    assert (back.hidden_dim, back.moe) == (192, hf_like.moe)
    # Meta's own constructor, handed the file, builds the same widths (layer 0 dense, layer 1 MoE).
    import fairscale.nn.model_parallel.initialize as fs_init
    import fairscale.nn.model_parallel.layers as fs_layers

    args = ModelArgs(**{**params, "moe_args": MoEArgs(**params["moe_args"])})
    with pytest.MonkeyPatch.context() as m, torch.device("meta"):
        m.setattr(fs_init, "get_model_parallel_world_size", lambda: 1)
        m.setattr(fs_layers, "get_model_parallel_world_size", lambda: 1)
        m.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
        dense, moe = TransformerBlock(0, args), TransformerBlock(1, args)
    assert tuple(dense.feed_forward.w1.weight.shape) == (192, 64)
    assert tuple(moe.feed_forward.experts.w1.shape) == (4, 64, 96)
    assert tuple(moe.feed_forward.shared_expert.w1.weight.shape) == (96, 64)
