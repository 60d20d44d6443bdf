"""The one-call decode step (native/step.py, step.c) on bf16 checkpoints and weight-only int8 / int4 models:
applied by `llamaherd.load` to Hugging Face Llama and Gemma 3 folders, as close to the float32 truth as the
per-module path it replaces (a float32 residual stream instead of bf16), the same codes multiplied as the
per-module weight-only kernels, greedy ids unchanged, and its plan following `.to()`."""

from __future__ import annotations

import copy

import pytest
import torch

import llamaherd
from llamaherd import native
from llamaherd.model.cache import KVCache
from llamaherd.native import step
from llamaherd.native import weight_only as native_wo
from tests.checkpoint_fixtures import hf_reference
from tests.conftest import TINY
from tests.test_gemma3 import hf_model as gemma3_hf
from tests.test_gemma3 import tiny as gemma3_tiny
from tests.test_native_step import PROMPTS, STEPS, Spy, assert_greedy_unchanged, kl

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler: the native kernels cannot be built")

# Widths every scheme takes: groups of 32 and 128 divide dim (128), the attention width (128) and hidden (384).
LLAMA = TINY["llama3.1"].replace(dim=128, hidden_dim=384, head_dim=32)
GEMMA = gemma3_tiny(dim=128, hidden_dim=384, head_dim=32, n_heads=4, n_kv_heads=2, n_layers=3,
                    query_pre_attn_scalar=32.0)


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def folder(request, tmp_path_factory):
    """A bf16 Hugging Face folder (transformers' own save_pretrained of a random model)."""
    ref = hf_reference(LLAMA, std=0.08) if request.param == "llama" else gemma3_hf(GEMMA)
    path = tmp_path_factory.mktemp("hf") / request.param
    ref.to(torch.bfloat16).save_pretrained(path)
    return request.param, path


def decode_logits(net, rows=PROMPTS, steps=STEPS) -> torch.Tensor:
    """Last-position logits of a left-padded prefill, then `steps` teacher-forced decode steps, (steps + 1, B, V),
    with a cache of the model's dtype as the engine makes it (engine/generate.py)."""
    dtype = net.tok_embeddings.weight.dtype
    B, L = len(rows), max(map(len, rows))
    pads = [L - len(r) for r in rows]
    tokens = torch.tensor([[0] * p + r for p, r in zip(pads, rows)])
    key_mask = torch.ones(B, L, dtype=torch.bool)
    for b, p in enumerate(pads):
        key_mask[b, :p] = False
    positions = (torch.arange(L)[None] - torch.tensor(pads)[:, None]).clamp(min=0)
    cache = KVCache.for_model(net.config, B, L + steps, dtype=dtype)
    with torch.inference_mode():
        out = [net(tokens, positions=positions, cache=cache, key_mask=key_mask)[:, -1]]
        for t in range(steps):
            key_mask = torch.cat([key_mask, torch.ones(B, 1, dtype=torch.bool)], 1)
            tok = torch.tensor([[(7 * t + 3 * b + 1) % 256] for b in range(B)])
            out.append(net(tok, positions=positions[:, -1:] + t + 1, cache=cache, key_mask=key_mask)[:, -1])
    return torch.stack(out).float()


def four_runs(net, float32_net, monkeypatch):
    """Decode logits of `net` on the step (asserting it ran every step), on the per-module path, on the torch
    reference (native kernels off), and of the float32 truth `float32_net()` (native kernels off too)."""
    spy = Spy(monkeypatch)
    got = decode_logits(net)
    assert spy.calls == STEPS
    with step.disabled():
        per_module = decode_logits(net)
    with native.disabled():
        return got, per_module, decode_logits(net), decode_logits(float32_net())


def test_bf16_checkpoint_at_least_as_close_to_float32_as_the_per_module_path(folder, monkeypatch):
    """bf16 weights, bf16 cache: the step's float32 residual stream is at least as close to the float32 truth
    (the same bf16 weights widened, the torch reference in float32) as the per-module path and the bf16 torch
    reference, which both round every hidden state to bf16."""
    family, path = folder
    model = llamaherd.load(path)
    assert model.net.tok_embeddings.weight.dtype == torch.bfloat16
    assert type(model.net) is (step.StepGemma3 if family == "gemma3" else step.StepLlama)
    got, per_module, reference, truth = four_runs(model.net, lambda: llamaherd.load(path, dtype=torch.float32).net,
                                                  monkeypatch)
    err = {name: float(kl(truth, x)[1:].mean()) for name, x in
           (("step", got), ("per-module", per_module), ("reference", reference))}
    assert err["step"] <= 1.1 * min(err["per-module"], err["reference"]) + 1e-7, err
    scale = truth.abs().max()
    assert (got - truth).abs().max() <= 1.1 * (per_module - truth).abs().max() + 1e-3 * scale
    agree, agree_module = ((x.argmax(-1) == truth.argmax(-1)).float().mean() for x in (got, per_module))
    assert agree >= agree_module - 0.1  # near-ties of a random model's flat logits go either way


@pytest.mark.parametrize("spec", ["int8", "int4-g32", pytest.param("int4", marks=pytest.mark.slow)])
def test_weight_only_codes_at_least_as_close_to_float32_as_the_per_module_path(folder, spec, monkeypatch):
    """int8 / int4 weight-only on a bf16 model: the step multiplies the codes the per-module kernels multiply
    (int16 activations) with a float32 residual stream, so it is at least as close
    to the float32 truth (the same codes and scales widened to float32, torch's own int8 / int4 kernels) as the
    per-module path and the bf16 torch reference are, and agrees with the per-module path's top-1 tokens. (int4's
    default int8 activation blocks: test_native_weight_only's step test.)"""
    _, path = folder
    monkeypatch.setattr(native_wo, "INT8_ACTIVATIONS", False)
    model = llamaherd.load(path, quantize=spec)
    got, per_module, reference, truth = four_runs(model.net, lambda: copy.deepcopy(model.net).float(), monkeypatch)
    err = {name: float(kl(truth, x)[1:].mean()) for name, x in
           (("step", got), ("per-module", per_module), ("reference", reference))}
    assert err["step"] <= 1.1 * min(err["per-module"], err["reference"]) + 1e-7, err
    assert kl(per_module, got)[1:].max() < 2e-3
    assert (got.argmax(-1) == per_module.argmax(-1)).float().mean() >= 0.95


@pytest.mark.parametrize("int16,int8", [(True, True), (True, False), pytest.param(False, False, marks=pytest.mark.slow)],
                         ids=["int8-blocks", "int16-activations", "float-activations"])
@pytest.mark.parametrize("spec", ["int4-g32", "int8"])
def test_weight_only_on_a_float32_model_equals_the_per_module_products(folder, spec, int16, int8, monkeypatch):
    """A float32 model (float32 cache and residual stream in both paths): the step's logits are the per-module
    path's up to float32 summation order, int4 and int8 codes, with every activation kind of the weight-only
    kernels (int8 blocks of weight_only_a8.c, the default; int16 codes; float32)."""
    monkeypatch.setattr(native_wo, "INT16_ACTIVATIONS", int16)
    monkeypatch.setattr(native_wo, "INT8_ACTIVATIONS", int8)
    _, path = folder
    model = llamaherd.load(path, dtype=torch.float32, quantize=spec)
    spy = Spy(monkeypatch)
    got = decode_logits(model.net)
    assert spy.calls == STEPS
    with step.disabled():
        want = decode_logits(model.net)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max(), float((got - want).abs().max() / want.abs().max())
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_greedy_generation_is_unchanged(folder, monkeypatch):
    """generate_tokens (a left-padded batch of two) yields the same greedy ids with the step on and off."""
    _, path = folder
    assert_greedy_unchanged(llamaherd.load(path, quantize="int8"), 8, monkeypatch)


def test_the_plan_follows_to_and_the_kernel_switches(folder, monkeypatch):
    """`.to(float32)` moves every weight: the step no longer applies (float32 matrices are not its kind) and the
    model decodes as the float32 reference; back to bf16 the plan is remade at the new addresses and the logits are the
    first run's. The weight-only kernels switched off (torch's kernels, the reference) take the step off too."""
    _, path = folder
    net = llamaherd.load(path).net
    spy = Spy(monkeypatch)
    first = decode_logits(net, steps=3)
    assert spy.calls == 3
    net.to(torch.float32)
    as_float = decode_logits(net, steps=3)
    assert spy.calls == 3
    with native.disabled():
        want = decode_logits(net, steps=3)
    assert (as_float - want).abs().max() <= 1e-5 * want.abs().max()  # the per-module glue: float32 rounding
    net.to(torch.bfloat16)
    assert torch.equal(decode_logits(net, steps=3), first)
    assert spy.calls == 6

    quantized = llamaherd.load(path, quantize="int8").net
    decode_logits(quantized, steps=2)
    assert spy.calls == 8
    with native_wo.switched_off():
        decode_logits(quantized, steps=2)
    assert spy.calls == 8


@pytest.mark.parametrize("bits", [pytest.param(4, marks=pytest.mark.slow), 8])
def test_gptq_folder_takes_the_step(tmp_path, bits, monkeypatch):
    """A GPTQ folder (quant/hf_quantized.py's PackedLinear: float32 scales and zeros, 8-bit codes as grouped 8-bit):
    the step applies and multiplies what the per-module kernels multiply."""
    from tests.test_quant_gptq_awq import _folder as gptq_folder

    folder, _ = gptq_folder(tmp_path, "gptq", bits=bits, group=32)
    model = llamaherd.load(folder)
    spy = Spy(monkeypatch)
    got = decode_logits(model.net)
    assert spy.calls == STEPS
    with step.disabled():
        want = decode_logits(model.net)
    if model.net.tok_embeddings.weight.dtype == torch.float32:  # the same float32 products, another sum order
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert kl(want, got)[1:].max() < 2e-3
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95


def test_a_model_mixing_kinds_takes_the_per_module_path(folder, monkeypatch):
    """One projection int8 among bf16 ones (two activation layouts in one product group): the step refuses the
    model and the per-module path computes it, exactly as with the step switched off."""
    from llamaherd.quant.weight_only import Int8Linear

    _, path = folder
    net = llamaherd.load(path).net
    ff = net.layers[-1].feed_forward
    ff.w2 = Int8Linear.from_linear(ff.w2.weight)
    spy = Spy(monkeypatch)
    got = decode_logits(net, steps=2)
    assert spy.calls == 0
    with step.disabled():
        assert torch.equal(got, decode_logits(net, steps=2))
