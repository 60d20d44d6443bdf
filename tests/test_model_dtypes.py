"""The decoder in float32, bfloat16 and float16, on CPU and (when present) CUDA; GPU cases skip without CUDA."""

import pytest
import torch

from llamaherd.model import KVCache

from .conftest import TINY, random_model

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
# Half-precision logits against float32: the model's logits span about +-30 here, so a few tenths is a few
# bf16 ulps accumulated over two layers; anything structurally wrong is off by the logits' whole scale.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.6, torch.float16: 0.1}


def _device(name):
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device(name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_dtype_forward_and_cache_match_float32(tiny_family, dtype, device):
    device = _device(device)
    _, config = tiny_family
    ref = random_model(config, std=0.1)
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids)
        net = random_model(config, std=0.1).to(device=device, dtype=dtype)
        full = net(ids.to(device))
        cache = KVCache.for_model(config, batch=2, max_len=32, dtype=dtype, device=device)
        steps = [net(ids[:, :10].to(device), cache=cache)]
        steps += [net(ids[:, t : t + 1].to(device), cache=cache) for t in range(10, 24)]
    assert full.dtype == torch.float32  # logits are float32 whatever the weights
    torch.testing.assert_close(full.cpu(), want, atol=TOLERANCE[dtype], rtol=0)
    torch.testing.assert_close(torch.cat(steps, 1).cpu(), want, atol=TOLERANCE[dtype], rtol=0)
    # The greedy choice is what generation sees: it must agree almost everywhere.
    agree = (full.cpu().argmax(-1) == want.argmax(-1)).float().mean()
    assert agree >= (1.0 if dtype == torch.float32 else 0.9)


def test_load_casts_to_the_requested_dtype(tmp_path):
    from llamaherd import load
    from llamaherd.checkpoint.base import Checkpoint
    from llamaherd.checkpoint.save import save

    config = TINY["llama3"]
    net = random_model(config)
    save(Checkpoint(config, net.state_dict(), tmp_path / "src"), tmp_path / "meta", "meta")
    model = load(tmp_path / "meta", dtype=torch.bfloat16)
    assert {p.dtype for p in model.net.parameters()} == {torch.bfloat16}
    ids = list(range(1, 20))
    torch.testing.assert_close(model.logits(ids), net(torch.tensor([ids]))[0].detach(), atol=0.6, rtol=0)
