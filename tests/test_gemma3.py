"""Gemma 3 parity: our decoder against transformers' Gemma3ForCausalLM on tiny random configurations."""

from __future__ import annotations

import pytest
import torch

from llamaherd.config import ModelConfig, RopeScaling
from llamaherd.model import KVCache, build
from llamaherd.checkpoint.gemma3 import GGUF_NAMES, HF_NAMES, from_gguf, to_gguf
from llamaherd.checkpoint.names import rename
from llamaherd.model.gemma3 import is_global_layer

transformers = pytest.importorskip("transformers")

SEQ = 20  # longer than the window (8) so local layers drop keys within the test


def tiny(**changes) -> ModelConfig:
    base = dict(
        arch="gemma3", dim=64, n_layers=6, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=96, vocab_size=256,
        norm_eps=1e-6, rope_theta=1e6, rope_local_theta=1e4, max_seq_len=512, tie_embeddings=True,
        sliding_window=8, sliding_window_pattern=3, query_pre_attn_scalar=24.0,
    )
    base.update(changes)
    return ModelConfig(**base)


VARIANTS = {
    "plain": tiny(),
    # Gemma 3 4B+ shape: linear rope scaling on global layers, plus a softcapped output.
    "scaled_softcap": tiny(rope_scaling=RopeScaling(kind="linear", factor=8.0), final_logit_softcap=5.0),
    "untied_mha": tiny(n_kv_heads=4, tie_embeddings=False, sliding_window_pattern=2),
    # Gemma 2's attention-score cap: Gemma 3 ignores it, as transformers' Gemma3Attention does.
    "attn_softcap": tiny(attn_logit_softcap=3.0),
}


def hf_model(c: ModelConfig, seed: int = 0):
    full = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling is not None:
        full = {"rope_type": "linear", "factor": c.rope_scaling.factor, "rope_theta": c.rope_theta}
    cfg = transformers.Gemma3TextConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        rms_norm_eps=c.norm_eps, max_position_embeddings=c.max_seq_len, sliding_window=c.sliding_window,
        layer_types=["full_attention" if is_global_layer(c, i) else "sliding_attention" for i in range(c.n_layers)],
        rope_parameters={"full_attention": full, "sliding_attention": {"rope_type": "default", "rope_theta": c.rope_local_theta}},
        query_pre_attn_scalar=int(c.query_pre_attn_scalar), final_logit_softcapping=c.final_logit_softcap,
        attn_logit_softcapping=c.attn_logit_softcap,
        tie_word_embeddings=c.tie_embeddings, pad_token_id=0,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    ref = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            # Norm weights are offsets from one: random around zero moves every norm.
            p.normal_(0.0, 0.3 if name.endswith("norm.weight") else 0.15)
    return ref


def convert(ref, c: ModelConfig) -> torch.nn.Module:
    """HF weights into our model through our name table."""
    sd = {}
    for name, t in ref.state_dict().items():
        target = rename(name, HF_NAMES)
        assert target is not None, f"no canonical name for {name}"
        if target == "output.weight" and c.tie_embeddings:
            continue
        sd[target] = t
    net = build(c, device="meta")
    net.load_state_dict(sd, strict=True, assign=True)
    return net.eval()


@pytest.fixture(params=sorted(VARIANTS), scope="module")
def pair(request):
    c = VARIANTS[request.param]
    ref = hf_model(c)
    return c, ref, convert(ref, c)


def test_full_forward_matches_transformers(pair):
    c, ref, ours = pair
    tokens = torch.randint(0, c.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(tokens).logits
        got = ours(tokens)
    assert got.dtype == torch.float32 and got.shape == (2, SEQ, c.vocab_size)
    assert expected.abs().max() > 1.0  # the random weights move the logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_cached_decoding_matches_transformers(pair):
    """Prefill 5, a chunk of 6 across the window edge, then one token at a time: each step equals the full pass."""
    c, ref, ours = pair
    tokens = torch.randint(0, c.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref(tokens).logits
        cache = KVCache.for_model(c, batch=1, max_len=SEQ)
        pieces = [ours(tokens[:, :5], cache=cache), ours(tokens[:, 5:11], cache=cache)]
        pieces += [ours(tokens[:, t : t + 1], cache=cache) for t in range(11, SEQ)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected, atol=1e-4, rtol=1e-4)


def test_left_padded_batch_matches_unpadded_rows(pair):
    c, ref, ours = pair
    g = torch.Generator().manual_seed(3)
    long, short = torch.randint(1, c.vocab_size, (SEQ,), generator=g), torch.randint(1, c.vocab_size, (13,), generator=g)
    pad = SEQ - len(short)
    batch = torch.stack([long, torch.cat([torch.zeros(pad, dtype=torch.long), short])])
    key_mask = torch.ones(2, SEQ + 3, dtype=torch.bool)
    key_mask[1, :pad] = False
    positions = torch.stack([torch.arange(SEQ), (torch.arange(SEQ) - pad).clamp(min=0)])
    extra = torch.randint(1, c.vocab_size, (2, 3), generator=g)
    with torch.no_grad():
        cache = KVCache.for_model(c, batch=2, max_len=SEQ + 3)
        first = ours(batch, positions=positions, cache=cache, key_mask=key_mask[:, :SEQ])
        steps = [
            ours(extra[:, i : i + 1], positions=positions[:, -1:] + 1 + i, cache=cache, key_mask=key_mask[:, : SEQ + 1 + i])
            for i in range(3)
        ]
        got = torch.cat([first, *steps], dim=1)
        exp_long = ref(torch.cat([long, extra[0]])[None]).logits[0]
        exp_short = ref(torch.cat([short, extra[1]])[None]).logits[0]
    torch.testing.assert_close(got[0], exp_long, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1, pad:], exp_short, atol=1e-4, rtol=1e-4)


def test_window_matters_in_these_tests():
    """Guard: with the window widened to the whole sequence the logits change, so the parity above tests it."""
    c = VARIANTS["plain"]
    ref = hf_model(c)
    ours, wide = convert(ref, c), convert(ref, c.replace(sliding_window=SEQ + 1))
    tokens = torch.randint(0, c.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (ours(tokens)[:, -1] - wide(tokens)[:, -1]).abs().max() > 1e-2
        torch.testing.assert_close(ours(tokens)[:, :8], wide(tokens)[:, :8])


def test_bfloat16_forward_close_to_transformers():
    c = VARIANTS["plain"]
    ref = hf_model(c).to(torch.bfloat16)
    ours = convert(ref, c)
    tokens = torch.randint(0, c.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected, got = ref(tokens).logits.float(), ours(tokens)
    # Different but equally valid bf16 kernels (sdpa vs eager): compare loosely, and top-1 exactly.
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9
    torch.testing.assert_close(got, expected, atol=0.15 * expected.abs().max().item(), rtol=0.1)


# ---- name tables ---------------------------------------------------------------------------------


def test_gguf_table_covers_every_parameter():
    """Every canonical parameter has a GGUF name; the names are llama.cpp's (gguf-py's tensor table)."""
    import gguf

    c = tiny(tie_embeddings=False)
    known = set()
    for tensor, name in gguf.TENSOR_NAMES.items():
        if tensor in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GEMMA3]:
            known.add(name.replace("{bid}", "{i}") + ".weight")
    assert set(GGUF_NAMES) <= known, sorted(set(GGUF_NAMES) - known)
    params = set(build(c, device="meta").state_dict())
    mapped = {rename(g.replace("{i}", str(i)), GGUF_NAMES) for g in GGUF_NAMES for i in range(c.n_layers)}
    assert params <= mapped, sorted(params - mapped)


def test_gguf_norm_offset_agrees_with_transformers_gguf_loader():
    """transformers' own GGUF loader (Gemma2TensorProcessor, used for gemma3) subtracts the same offset."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS

    proc = TENSOR_PROCESSORS["gemma3"]()
    stored = 1.0 + 0.3 * torch.randn(16)
    for gguf_name in ("blk.0.attn_q_norm.weight", "blk.3.post_ffw_norm.weight", "output_norm.weight"):
        expected = torch.as_tensor(proc.process(stored.numpy(), gguf_name).weights)
        ours = from_gguf(rename(gguf_name, GGUF_NAMES), stored)
        torch.testing.assert_close(ours, expected, atol=0, rtol=0)
        torch.testing.assert_close(to_gguf(rename(gguf_name, GGUF_NAMES), ours), stored)
    x = torch.randn(4, 4)
    assert from_gguf("layers.0.attention.wq.weight", x) is x
