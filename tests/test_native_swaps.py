"""The post-load swaps (llamaherd/native/swaps.py): applied by `llamaherd.load`, switchable, and equal to the
reference model of every family on prefill and cached decode; float32 logits at every length (issue 17)."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as QT

import llamaherd
from llamaherd import native
from llamaherd.model.cache import KVCache
from llamaherd.native import dense, ggml_kernels, swaps
from tests.conftest import TINY, random_model
from tests.gguf_read_fixtures import write_llama_gguf

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler: the native kernels cannot be built")

PROMPT = [[3, 17, 99, 5, 250], [1, 2, 3, 4, 5]]


def native_types(net: torch.nn.Module) -> set[str]:
    return {type(m).__name__ for m in net.modules() if type(m) in swaps.NATIVE.values()}


def reference_left(net: torch.nn.Module) -> list[str]:
    return [name for name, m in net.named_modules() if type(m) in swaps.NATIVE]


def q8_model(tmp_path, name: str = "llama3"):
    c = TINY[name]
    path = tmp_path / "tiny.gguf"
    written = write_llama_gguf(path, c, random_model(c).state_dict(), QT.Q8_0)
    return path, written


def test_load_applies_the_swaps_and_the_switch_keeps_the_reference(tmp_path):
    path, _ = q8_model(tmp_path)
    model = llamaherd.load(path)
    assert native_types(model.net) == {"NativeRMSNorm", "NativeRotary", "DecodeAttention", "NativeVocabProjection"}
    assert reference_left(model.net) == []
    with native.disabled():
        plain = llamaherd.load(path)
        assert native_types(plain.net) == set() and reference_left(plain.net)
        # Switched off at run time, a swapped model computes exactly what the reference model computes.
        assert torch.equal(model.logits(PROMPT), plain.logits(PROMPT))
    assert set(model.net.state_dict()) == set(plain.net.state_dict())


def family_configs():
    from tests.test_gemma3 import tiny as gemma3_tiny
    from tests.test_llama4 import CONFIG as llama4_config

    return {"llama": TINY["llama3.2"], "llama2": TINY["llama2"], "gemma3": gemma3_tiny(), "llama4": llama4_config}


EXPECTED = {  # the swapped module types of each family
    "llama": {"NativeRMSNorm", "NativeRotary", "DecodeAttention", "NativeVocabProjection"},
    "llama2": {"NativeRMSNorm", "NativeRotary", "DecodeAttention", "NativeVocabProjection"},
    "gemma3": {"NativeGemmaRMSNorm", "NativeRotaryHalves", "GemmaDecodeAttention", "NativeVocabProjection"},
    "llama4": {"NativeRMSNorm", "NativeRotary", "NativeL2Norm", "NativeVocabProjection"},
}


def prefill_and_decode(net: torch.nn.Module, steps: int = 6) -> torch.Tensor:
    """Logits of a 5-token prefill into a cache, then `steps` teacher-forced cached decode steps."""
    prompt = torch.tensor(PROMPT)
    cache = KVCache.for_model(net.config, prompt.shape[0], prompt.shape[1] + steps)
    with torch.inference_mode():
        out = [net(prompt, cache=cache)]
        for t in range(steps):
            out.append(net(torch.tensor([[7 + t], [40 + 3 * t]]), cache=cache))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_swapped_model_matches_the_reference(family):
    config = family_configs()[family]
    reference = random_model(config, std=0.1).eval()
    swapped = random_model(config, std=0.1).eval()
    assert swaps.apply(swapped) > 0
    assert native_types(swapped) == EXPECTED[family] and reference_left(swapped) == []
    want, got = prefill_and_decode(reference), prefill_and_decode(swapped)
    # Same operations, float32 sums in another order (tests/test_native_ops.py bounds each op); compounded
    # over the layers and steps they stay within 1e-5 of the logits' scale. A wrong layout, slot, norm or
    # mask moves logits by their own magnitude.
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    with native.disabled():
        assert torch.equal(prefill_and_decode(swapped), want)


def projection_input(net: torch.nn.Module, ids: list[list[int]], forward) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, the hidden states the vocabulary projection received) of one forward."""
    seen = []
    hook = net.project.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
    try:
        logits = forward(ids)
    finally:
        hook.remove()
    return logits, seen[0]


def assert_float32_products(logits: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> None:
    """logits == h @ w.T to float32 accumulation accuracy (bound as tests/test_dense_kernel.py: every term
    through at most K + 8 roundings of 2^-24), far tighter than the 2^-9 relative step of a bf16 output."""
    K = w.shape[1]
    h2 = h.reshape(-1, K).double()
    want = h2 @ w.double().T
    bound = (K + 8) * 2.0**-24 * (h2.abs() @ w.double().abs().T) + 1e-30
    err = (logits.reshape(want.shape).double() - want).abs()
    assert (err <= bound).all(), f"max error / bound = {(err / bound).max().item():.3g}"
    assert logits.dtype == torch.float32
    assert not torch.equal(logits, logits.bfloat16().float())  # not bf16 values widened


@pytest.mark.skipif(not ggml_kernels.BF16_PREFILL, reason="this CPU has no AVX-512 BF16 / AMX: no bf16 prefill path")
def test_gguf_logits_over_many_positions_are_float32(tmp_path):
    """Issue 17: 32 positions take the bf16 GEMM path in every layer; the vocabulary projection stays float32."""
    path, written = q8_model(tmp_path)
    model = llamaherd.load(path)
    ids = [(torch.arange(32) * 7 % 256).tolist()]
    logits, h = projection_input(model.net, ids, model.logits)
    assert_float32_products(logits, h, torch.from_numpy(written["output.weight"]))


@pytest.mark.parametrize("rows", [1, 32])  # the matrix-vector kernel's case and a GEMM's
@pytest.mark.parametrize("family", ["llama3", "llama3.2", "gemma3", "llama4"])  # llama3.2: tied output
def test_bf16_model_logits_are_float32_products(family, rows):
    """Every family's bf16 logits are float32 sums, for one position (the native kernel) and for 32 (more rows
    than that kernel takes)."""
    assert dense.available()
    config = TINY[family] if family in TINY else family_configs()[family]
    net = random_model(config, std=0.1).to(torch.bfloat16).eval()
    swaps.apply(net)
    assert type(net.project) is swaps.NativeVocabProjection
    seen = []
    hook = net.project.register_forward_hook(lambda _, args, out: seen.append((args[0], out)))
    ids = torch.arange(2 * rows).reshape(2, rows) * 5 % config.vocab_size
    with torch.inference_mode():
        net(ids)
    hook.remove()
    h, logits = seen[0]
    assert_float32_products(logits, h, net.output_weight())
