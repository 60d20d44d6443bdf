"""Each rank loads only its slice: Meta folders of N shards read rank by rank (no merge), HF safetensors sliced
from the memory map; the logits of 2 ranks equal one process's, and Meta's own reference (llama-models on
fairscale's model-parallel layers) run rank by rank on the same shards agrees."""

from __future__ import annotations

import json

import pytest
import torch

import llamaherd
from llamaherd.checkpoint.transforms import split_shards
from llamaherd.train.distributed import launch

from .checkpoint_fixtures import hf_reference, meta_params, save_meta_folder
from .conftest import random_model
from .parallel_fixtures import FAMILIES, LLAMA4_PARAMS, inputs, load_worker, meta_worker

TOL = 1e-4


def _meta_folders(tmp_path) -> dict[str, tuple]:
    """name -> (folder of 2 shards, folder of 1 shard) holding the same random weights."""
    out = {}
    cases = {  # name: (config, Meta's embedding cut, tied)
        "llama3": (FAMILIES["llama3"].replace(vocab_size=256), 0, False),
        "llama2": (FAMILIES["llama2"], 1, False),  # Llama 2's ParallelEmbedding: the width is cut
        "llama3.2": (FAMILIES["llama3.2"].replace(vocab_size=256), 0, True),
    }
    for name, (c, emb_dim, tied) in cases.items():
        sd = random_model(c.replace(tie_embeddings=False), seed=5).state_dict()
        if tied:  # Meta's Llama 3.2 1B/3B files carry output.weight as a copy of the embedding
            sd["output.weight"] = sd["tok_embeddings.weight"].clone()
        params = meta_params(c)
        if name == "llama2":
            params["vocab_size"] = -1  # as Llama 2's params.json says: the vocabulary comes from the weights
        out[name] = tuple(save_meta_folder(sd, params, tmp_path / f"{name}-{n}", shards=n, embedding_dim=emb_dim)
                          for n in (2, 1))
    # Llama 4: Meta's layout (experts (E, D, F), F cut) written with the shard rule table
    sd = random_model(FAMILIES["llama4"].replace(vocab_size=256), seed=5).state_dict()
    pair = []
    for n in (2, 1):
        d = tmp_path / f"llama4-{n}"
        d.mkdir()
        (d / "params.json").write_text(json.dumps(LLAMA4_PARAMS))
        for i, part in enumerate(split_shards(sd, n, arch="llama4")):
            torch.save(part, d / f"consolidated.{i:02d}.pth")
        pair.append(d)
    out["llama4"] = tuple(pair)
    return out


def _check(tmp_path, names: list[str], with_meta: bool) -> None:
    folders = {n: pair for n, pair in _meta_folders(tmp_path).items() if n in names}
    with torch.inference_mode():
        want = {}
        if "hf" in names:
            hf = hf_reference(FAMILIES["llama3"], seed=2)
            hf.save_pretrained(tmp_path / "hf")  # safetensors: each rank slices the memory map
            want["hf"] = hf(inputs(FAMILIES["llama3"])).logits.float()
        for name, (_, one) in folders.items():
            model = llamaherd.load(one, dtype=torch.float32)
            want[name] = model.net(inputs(model.config))
    out = tmp_path / "out"
    out.mkdir()
    ours = {n: str(two) for n, (two, _) in folders.items()}
    if "hf" in names:
        ours["hf"] = str(tmp_path / "hf")
    assert launch(load_worker, (ours, str(out)), 2) == 0
    # llama-models ships Llama 3's and 4's modules (VocabParallelEmbedding); Llama 2's width-cut embedding
    # (ParallelEmbedding) belongs to the Llama 2 repository's model.py, which it does not ship.
    meta_runs = {n: str(two) for n, (two, _) in folders.items() if n != "llama2"} if with_meta else {}
    if meta_runs:
        assert launch(meta_worker, (meta_runs, str(out)), 2) == 0
    for name, logits in want.items():
        for rank in range(2):
            for kind in ("ours", "meta") if name in meta_runs else ("ours",):
                got = torch.load(out / f"{name}.{kind}.rank{rank}.pt", weights_only=True)
                err = float((got - logits).abs().max())
                assert err <= TOL, f"{name} {kind} rank {rank}: max |diff| {err:.2e}"


def test_two_ranks_read_meta_shards_and_hf_slices_and_agree_with_one_process(tmp_path):
    _check(tmp_path, ["llama3", "hf"], with_meta=False)


@pytest.mark.slow
def test_every_layout_and_metas_reference_rank_by_rank(tmp_path):
    _check(tmp_path, ["llama3", "llama2", "llama3.2", "llama4", "hf"], with_meta=True)
