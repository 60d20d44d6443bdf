"""The decoder's KV cache: prefill + token-by-token decoding equals one full forward, for every family."""

import torch

from llamaherd.model import KVCache

from .conftest import random_model


def test_cached_decoding_equals_full_forward(tiny_family):
    _, config = tiny_family
    net = random_model(config)
    ids = torch.randint(0, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = net(ids)
        cache = KVCache.for_model(config, batch=2, max_len=64)
        steps = [net(ids[:, :17], cache=cache)]
        steps += [net(ids[:, t : t + 1], cache=cache) for t in range(17, 40)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=0)
    assert cache.length == 40


def test_left_padded_batch_matches_unpadded_rows():
    from .conftest import TINY

    config = TINY["llama3"]
    net = random_model(config)
    a = torch.randint(0, config.vocab_size, (12,))
    b = torch.randint(0, config.vocab_size, (7,))
    pad = 12 - 7
    batch = torch.stack([a, torch.cat([torch.zeros(pad, dtype=torch.long), b])])
    key_mask = torch.ones(2, 12, dtype=torch.bool)
    key_mask[1, :pad] = False
    positions = torch.stack([torch.arange(12), (torch.arange(12) - pad).clamp(min=0)])
    with torch.no_grad():
        out = net(batch, positions=positions, key_mask=key_mask)
        alone = net(b[None])
    torch.testing.assert_close(out[1, pad:], alone[0], atol=1e-4, rtol=0)
    assert torch.isfinite(out).all()
