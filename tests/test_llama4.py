"""Llama 4 text decoder against Meta's llama-models reference and transformers' Llama4ForCausalLM."""

from __future__ import annotations

import pytest
import torch

from llamaherd.checkpoint.llama4 import config_from_params, config_to_hf, meta_to_hf
from llamaherd.model import build
from llamaherd.model.cache import KVCache
from llamaherd.model.llama4 import is_nope_layer
from llamaherd.model.moe import MoE

from .conftest import random_model

# A tiny Meta params.json with every Llama 4 feature active within ~48 tokens: 4 experts (top-1) in every
# second layer, chunks of 16, NoPE in every third layer, QK-norm, temperature tuning from position 3
# (floor_scale 4), and Scout's frequency scaling.
PARAMS = dict(
    dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, ffn_dim_multiplier=1.2,
    ffn_exp=4.0, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True, attention_chunk_size=16,
    nope_layer_interval=3, use_qk_norm=True, attn_temperature_tuning=True, floor_scale=4.0, attn_scale=0.1,
    moe_args=dict(num_experts=4, top_k=1, interleave_moe_layer_step=2), max_seq_len=128,
)
CONFIG = config_from_params(PARAMS)
SEQ = 48  # three chunks


def tokens(batch: int = 2, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CONFIG.vocab_size, (batch, seq), generator=g)


@pytest.fixture(scope="module")
def ours():
    return random_model(CONFIG, seed=0)


def meta_reference(params: dict, state_dict: dict, monkeypatch) -> torch.nn.Module:
    """Meta's llama4 Transformer on CPU, loaded with our (canonical-named) state dict through its own hooks."""
    from llama_models.llama4.args import ModelArgs, MoEArgs
    from llama_models.llama4.model import Transformer as MetaTransformer

    args = ModelArgs(**{**params, "moe_args": MoEArgs(**params["moe_args"]), "max_batch_size": 2})
    # The reference allocates its KV cache with .cuda(); this CPU-only machine keeps it where it is.
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    ref = MetaTransformer(args)
    ref.load_state_dict(state_dict, strict=True)
    return ref.eval()


def meta_logits(ref, toks: torch.Tensor) -> torch.Tensor:
    from llama_models.llama4.datatypes import TransformerInput

    return ref(TransformerInput(tokens=toks, tokens_position=0)).logits


def hf_reference(config, state_dict: dict):
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    hf_cfg = Llama4TextConfig(**config_to_hf(config))
    hf_cfg._attn_implementation = "eager"
    hf = Llama4ForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(meta_to_hf(state_dict, config), strict=False)
    assert not unexpected and missing == (["lm_head.weight"] if config.tie_embeddings else [])
    if config.tie_embeddings:  # the checkpoint omits the head; transformers ties it to the embedding
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    return hf


def test_tiny_config_exercises_every_feature():
    assert CONFIG.moe.hidden_dim == 128 and CONFIG.hidden_dim == 224  # Meta's width rules, see moe_hidden_dim
    assert [is_nope_layer(CONFIG, i) for i in range(4)] == [False, False, True, False]
    assert [CONFIG.moe.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
    net = build(CONFIG, device="meta")
    assert isinstance(net.layers[1].feed_forward, MoE) and not isinstance(net.layers[0].feed_forward, MoE)


def test_matches_meta_reference(ours, meta_parallel, monkeypatch):
    ref = meta_reference(PARAMS, ours.state_dict(), monkeypatch)
    toks = tokens()
    with torch.no_grad():
        got = ours(toks)
    torch.testing.assert_close(got, meta_logits(ref, toks), atol=1e-4, rtol=1e-4)


def test_matches_transformers(ours):
    hf = hf_reference(CONFIG, ours.state_dict())
    toks = tokens()
    with torch.no_grad():
        want = hf(toks).logits.float()
        got = ours(toks)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_matches_transformers_top2_tied():
    # top-2 routing, experts in every layer, tied embeddings: paths the released rows do not take.
    config = CONFIG.replace(moe=CONFIG.moe.__class__(num_experts=4, top_k=2, hidden_dim=64, interleave_step=1),
                            tie_embeddings=True)
    net = random_model(config, seed=3)
    hf = hf_reference(config, net.state_dict())
    toks = tokens(seq=40, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(net(toks), hf(toks).logits.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "change",
    [
        dict(attention_chunk_size=None),
        dict(nope_layer_interval=None),
        dict(use_qk_norm=False),
        dict(attn_temperature_tuning=False),
        dict(rope_scaling=None),
    ],
    ids=lambda c: next(iter(c)),
)
def test_each_feature_changes_logits(ours, change):
    toks = tokens()
    other = build(CONFIG.replace(**change))
    other.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        diff = (ours(toks) - other(toks)).abs().max().item()
    assert diff > 1e-2, f"switching off {change} moved the logits by only {diff}"


def _router_choices(model: torch.nn.Module, moe_type: type, run) -> list[torch.Tensor]:
    """Top-1 expert per token at each MoE layer, recomputed from the layer's input and its router weights."""
    seen: list[torch.Tensor] = []

    def hook(module, args):
        x = args[0].reshape(-1, args[0].shape[-1])
        seen.append(torch.topk(x @ module.router_DE, 1, dim=-1).indices[:, 0])

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, moe_type)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return seen


def test_router_choices_match_meta(ours, meta_parallel, monkeypatch):
    from llama_models.llama4.moe import MoE as MetaMoE

    ref = meta_reference(PARAMS, ours.state_dict(), monkeypatch)
    toks = tokens()
    want = _router_choices(ref, MetaMoE, lambda: meta_logits(ref, toks))
    # Ours: what MoE.route actually returned, not a recomputation.
    got: list[torch.Tensor] = []
    handles = []
    for m in ours.modules():
        if isinstance(m, MoE):
            original = m.route
            def route(x, _orig=original):
                idx, gates = _orig(x)
                got.append(idx[:, 0])
                return idx, gates
            m.route = route
            handles.append(m)
    try:
        with torch.no_grad():
            ours(toks)
    finally:
        for m in handles:
            del m.route
    assert len(want) == len(got) == 2
    for w, g in zip(want, got):
        assert torch.equal(w, g)
        assert len(torch.unique(g)) > 1  # the test inputs do route to several experts


# -- cached decoding ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefill", [1, 5, 20, 33])
def test_cached_decoding_equals_full_forward(ours, prefill):
    """Prefill then one token at a time, across chunk boundaries at 16 and 32: every position as the full pass."""
    toks = tokens()
    with torch.no_grad():
        full = ours(toks)
        cache = KVCache.for_model(CONFIG, batch=2, max_len=SEQ)
        steps = [ours(toks[:, :prefill], cache=cache)]
        for t in range(prefill, SEQ):
            steps.append(ours(toks[:, t : t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


def test_cached_multi_token_steps_equal_full_forward(ours):
    """Several tokens per step with a non-empty cache (the masked path), steps straddling chunk boundaries."""
    toks = tokens()
    with torch.no_grad():
        full = ours(toks)
        cache = KVCache.for_model(CONFIG, batch=2, max_len=SEQ)
        outs, t = [], 0
        for n in (7, 12, 3, 10, 16):
            outs.append(ours(toks[:, t : t + n], cache=cache))
            t += n
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-4, rtol=1e-4)


def test_transformers_cached_path_agrees(ours):
    """transformers' own cached decoding, one token at a time past two chunk boundaries, as our full forward."""
    from transformers import DynamicCache

    hf = hf_reference(CONFIG, ours.state_dict())
    toks = tokens(batch=1)
    with torch.no_grad():
        full = ours(toks)
        cache = DynamicCache(config=hf.config)
        outs = [hf(toks[:, :10], past_key_values=cache, use_cache=True).logits]
        for t in range(10, SEQ):
            outs.append(hf(toks[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(outs, dim=1).float(), full, atol=1e-4, rtol=1e-4)


def test_left_padded_batch_equals_unpadded_rows(ours):
    """key_mask + positions: a left-padded row decodes exactly as the same row alone, chunks counted by position."""
    toks = tokens(batch=2, seq=40)
    pad = 9
    lengths = [40, 40 - pad]
    batch = toks.clone()
    batch[1, :pad] = 0
    key_mask = torch.ones(2, SEQ, dtype=torch.long)
    key_mask[1, :pad] = 0
    positions = (torch.cumsum(key_mask, 1) - 1).clamp(min=0)
    with torch.no_grad():
        alone = [ours(toks[i : i + 1, 40 - n :]) for i, n in enumerate(lengths)]
        cache = KVCache.for_model(CONFIG, batch=2, max_len=SEQ)
        prompt = 30  # the padded row (9 pads) crosses its first chunk boundary inside the prompt
        outs = [ours(batch[:, :prompt], positions=positions[:, :prompt], cache=cache, key_mask=key_mask[:, :prompt])]
        for t in range(prompt, 40):
            outs.append(ours(batch[:, t : t + 1], positions=positions[:, t : t + 1], cache=cache,
                             key_mask=key_mask[:, : t + 1]))
    got = torch.cat(outs, dim=1)
    torch.testing.assert_close(got[0], alone[0][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1, pad:], alone[1][0], atol=1e-4, rtol=1e-4)
