"""Parity: our Llama, loaded through our converters, against Meta's reference and transformers' LlamaForCausalLM."""

from __future__ import annotations

import pytest
import torch

from llamaherd.checkpoint import Checkpoint, hf, materialize, meta_pth
from llamaherd.model import KVCache
from tests.checkpoint_fixtures import hf_reference, meta_params, meta_reference, save_meta_folder
from tests.conftest import TINY

ATOL = 1e-4
T, PREFILL = 7, 4
# Llama 3.1 scaling only moves low frequencies (wavelength > 8192 / high_freq_factor); start beyond the
# original 8192-token context so it changes the logits visibly. Other families start at 0.
START = {"llama2": 0, "llama3": 0, "llama3.1": 9000, "llama3.2": 9000}


def _tokens(c, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, c.vocab_size, (2, T), generator=g)


def _positions(start: int, lo: int, hi: int) -> torch.Tensor:
    return torch.arange(start + lo, start + hi)[None].expand(2, -1)


@torch.inference_mode()
def ours_full(net, tokens, start):
    return net(tokens, positions=_positions(start, 0, tokens.shape[1]))


@torch.inference_mode()
def ours_cached(net, tokens, start):
    """Prefill PREFILL tokens, then decode the rest one at a time through our KVCache."""
    cache = KVCache.for_model(net.config, batch=tokens.shape[0], max_len=T)
    outs = [net(tokens[:, :PREFILL], positions=_positions(start, 0, PREFILL), cache=cache)]
    for i in range(PREFILL, T):
        outs.append(net(tokens[:, i : i + 1], positions=_positions(start, i, i + 1), cache=cache))
    return torch.cat(outs, dim=1)


def meta_logits(ref, tokens, start, cached: bool):
    # Meta's forward slices its RoPE table at start_pos and attends over cache slots [0, start_pos + T);
    # starting it at 9000 would attend over 9000 empty slots. Shifting the table it precomputed (with its
    # own apply_scaling) by `start` puts slot 0 at position `start` and leaves its arithmetic untouched.
    full_table = ref.freqs_cis
    ref.freqs_cis = full_table[start:]
    try:
        if not cached:
            return ref(tokens, 0)
        outs = [ref(tokens[:, :PREFILL], 0)]
        for i in range(PREFILL, T):
            outs.append(ref(tokens[:, i : i + 1], i))
        return torch.cat(outs, dim=1)
    finally:
        ref.freqs_cis = full_table


@torch.inference_mode()
def hf_logits(ref, tokens, start, cached: bool):
    if not cached:
        return ref(input_ids=tokens, position_ids=_positions(start, 0, T)).logits.float()
    out = ref(input_ids=tokens[:, :PREFILL], position_ids=_positions(start, 0, PREFILL), use_cache=True)
    outs, past = [out.logits], out.past_key_values
    for i in range(PREFILL, T):
        out = ref(input_ids=tokens[:, i : i + 1], position_ids=_positions(start, i, i + 1),
                  past_key_values=past, use_cache=True)
        outs.append(out.logits)
        past = out.past_key_values
    return torch.cat(outs, dim=1).float()


def _close(ours, theirs):
    diff = (ours - theirs).abs().max().item()
    assert diff <= ATOL, f"max abs logit diff {diff:.3g} > {ATOL}"


@pytest.mark.parametrize("family", sorted(TINY))
def test_meta_reference_parity(family, meta_parallel, tmp_path):
    c = TINY[family]
    ref = meta_reference(c)
    sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    save_meta_folder(sd, meta_params(c), tmp_path / "meta")
    ckpt = meta_pth.read(tmp_path / "meta")
    assert ckpt.config.tie_embeddings == c.tie_embeddings
    net = materialize(ckpt)
    tokens, start = _tokens(c), START[family]
    for cached in (False, True):
        theirs = meta_logits(ref, tokens, start, cached)
        ours = (ours_cached if cached else ours_full)(net, tokens, start)
        _close(ours, theirs)


@pytest.mark.parametrize("family", ["llama2", "llama3"])
def test_two_shard_meta_checkpoint(family, meta_parallel, tmp_path):
    """A 2-way model-parallel folder (Llama 2 splits embeddings by width, Llama 3 by vocabulary)."""
    c = TINY[family]
    ref = meta_reference(c, seed=3)
    sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    save_meta_folder(sd, meta_params(c), tmp_path / "meta", shards=2, embedding_dim=1 if family == "llama2" else 0)
    ckpt = meta_pth.read(tmp_path / "meta")
    assert ckpt.metadata["shards"] == 2
    for name, t in sd.items():
        assert torch.equal(ckpt.state_dict[name], t), name
    tokens = _tokens(c)
    _close(ours_full(materialize(ckpt), tokens, 0), meta_logits(ref, tokens, 0, cached=False))


@pytest.mark.parametrize("family", sorted(TINY))
def test_hf_reference_parity(family, tmp_path):
    c = TINY[family]
    ref = hf_reference(c)
    ref.save_pretrained(tmp_path / "hf")
    ckpt = hf.read(tmp_path / "hf")
    assert ckpt.config.rope_scaling == c.rope_scaling and ckpt.config.tie_embeddings == c.tie_embeddings
    net = materialize(ckpt)
    tokens, start = _tokens(c), START[family]
    for cached in (False, True):
        _close((ours_cached if cached else ours_full)(net, tokens, start), hf_logits(ref, tokens, start, cached))


def test_scaling_matters_at_long_positions():
    """The Llama 3.1 cases above would pass vacuously if scaling did not change logits at START."""
    from tests.conftest import random_model

    c = TINY["llama3.1"]
    scaled = random_model(c)
    unscaled = random_model(c.replace(rope_scaling=None))
    tokens = _tokens(c)
    diff = (ours_full(scaled, tokens, START["llama3.1"]) - ours_full(unscaled, tokens, START["llama3.1"])).abs().max()
    assert diff > 100 * ATOL


@pytest.mark.parametrize("family", sorted(TINY))
def test_ours_to_hf_runs_in_transformers(family, tmp_path):
    """Our HF writer's folder loads in transformers and gives our logits; reading it back is lossless."""
    from transformers import LlamaForCausalLM

    from tests.conftest import random_model

    c = TINY[family]
    net = random_model(c, seed=5)
    ckpt = Checkpoint(config=c, state_dict=net.state_dict(), source=tmp_path)
    hf.write(ckpt, tmp_path / "hf")
    ref = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokens, start = _tokens(c), START[family]
    _close(ours_full(net, tokens, start), hf_logits(ref, tokens, start, cached=False))
    back = hf.read(tmp_path / "hf")
    assert back.config.hidden_dim == c.hidden_dim and back.config.rope_scaling == c.rope_scaling
    assert set(back.state_dict) == set(net.state_dict())
    for name, t in net.state_dict().items():
        assert torch.equal(back.state_dict[name], t), name
