"""Tensor parallelism on gloo (spawned CPU processes): every family's logits cut over 2 and 4 ranks equal the
uncut model's within 1e-4 in float32, full forward and cached decode, and greedy generation picks the same ids."""

from __future__ import annotations

import pytest
import torch

from llamaherd.model import build
from llamaherd.parallel import ParallelError
from llamaherd.parallel.tp import check_cut, check_divisible, local_slice, vocab_range
from llamaherd.train.distributed import launch

from .conftest import random_model
from .parallel_fixtures import FAMILIES, runs, tp_worker

SEED = 3


def _check_against_one_process(tmp_path, world: int, families: list[str]) -> None:
    assert launch(tp_worker, (families, SEED, str(tmp_path)), world) == 0
    for name in families:
        want = runs(random_model(FAMILIES[name], seed=SEED))
        for rank in range(world):
            got = torch.load(tmp_path / f"{name}.rank{rank}.pt", weights_only=True)
            for key in ("full", "cached"):
                assert got[key].shape == want[key].shape, (name, key)
                err = float((got[key] - want[key]).abs().max())
                assert err <= 1e-4, f"{name} {key} rank {rank}/{world}: max |diff| {err:.2e}"
            assert got["greedy"] == want["greedy"], name
            assert got["batched"] == want["batched"], name


def test_two_ranks_equal_one_process_for_every_family(tmp_path):
    _check_against_one_process(tmp_path, 2, sorted(FAMILIES))


@pytest.mark.slow
def test_four_ranks_equal_one_process_for_every_family(tmp_path):
    _check_against_one_process(tmp_path, 4, sorted(FAMILIES))


# -- the cut without processes ----------------------------------------------------------------------------------


def test_rank_counts_that_do_not_divide_the_heads_are_refused_with_the_choices():
    with pytest.raises(ParallelError, match=r"--tp 3 must divide n_kv_heads 4.*pick one of \[1, 2, 4, 8\]"):
        check_divisible(FAMILIES["llama3"], 3)
    with pytest.raises(ParallelError,
                       match=r"--tp 8 must divide n_kv_heads 3, n_heads 6, hidden_dim 36.*pick one of \[1, 3, 6\]"):
        check_divisible(FAMILIES["llama3"].replace(n_heads=6, n_kv_heads=3, hidden_dim=36), 8)
    check_divisible(FAMILIES["llama3"].replace(n_kv_heads=1), 4)  # fewer KV heads than ranks: replicated


def test_fewer_kv_heads_than_ranks_give_each_rank_the_head_its_query_heads_read():
    # 8 query heads, 2 KV heads (rows of 16), 4 ranks: ranks 0, 1 read KV head 0, ranks 2, 3 KV head 1
    # (query head q reads KV head q // 4; rank r holds query heads 2r, 2r + 1)
    for rank, head in enumerate((0, 0, 1, 1)):
        for w in ("wk", "wv"):
            cut = local_slice(f"layers.0.attention.{w}.weight", (32, 64), "llama", 250, rank, 4, n_kv_heads=2)
            assert cut == (0, 16 * head, 16), (w, rank)
        assert local_slice("layers.0.attention.wq.weight", (128, 64), "llama", 250, rank, 4, 2) == (0, 32 * rank, 32)
    # as many KV heads as ranks or more: cut as Meta cuts them
    assert local_slice("layers.0.attention.wk.weight", (32, 64), "llama", 250, 1, 2, n_kv_heads=2) == (0, 16, 16)


def test_vocabulary_blocks_cover_every_row_once():
    for world in (2, 3, 4, 8):
        blocks = [vocab_range(250, r, world) for r in range(world)]
        assert blocks[0][0] == 0 and blocks[-1][1] == 250
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    # Meta's rule for the rest: wq rows (heads) in contiguous blocks, wo columns, experts' width
    assert local_slice("layers.0.attention.wq.weight", (64, 64), "llama", 250, 1, 2) == (0, 32, 32)
    assert local_slice("layers.0.attention.wo.weight", (64, 64), "llama", 250, 1, 2) == (1, 32, 32)
    assert local_slice("layers.1.feed_forward.experts.moe_w_out_eF_D", (4, 96, 64), "llama4", 250, 1, 4) == (1, 24, 24)
    assert local_slice("layers.0.attention_norm.weight", (64,), "llama", 250, 1, 2) is None


def test_models_it_does_not_cut_are_refused_by_name():
    from llamaherd.quant.weight_only import quantize

    net = build(FAMILIES["llama3"])
    check_cut(net, 4)  # the float reference model: fine
    quantize(net, "int8")
    with pytest.raises(ParallelError, match=r"layers\.0\.attention\.wq is a Int8Linear.*without --quantize"):
        check_cut(net, 2)
    with pytest.raises(ParallelError, match="arch 'mllama'"):
        check_divisible(FAMILIES["llama3"].replace(arch="mllama"), 2)
