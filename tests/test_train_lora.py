"""LoRA against PEFT on the same weights (forward and gradients, float32), the PEFT adapter format both ways,
QLoRA over packed ggml weights against gguf-py's decoding, merging."""

from __future__ import annotations

import pytest
import torch

import llamaherd
from llamaherd.errors import TrainingError
from llamaherd.lora.peft import load_adapter, save_adapter
from llamaherd.lora.layer import LoRAConfig, LoRALinear, adapters_disabled, apply_lora, lora_modules, merge_lora

from .train_fixtures import CONFIG, tiny_folder

ALL = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
TOL = 1e-5


def _randomize(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(net).values():
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.3)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.3)


def _tokens(seed=2, shape=(2, 9)):
    return torch.randint(0, CONFIG.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(our model with random LoRA on every linear, adapter folder, PEFT model loaded from that folder)."""
    from peft import PeftModel

    folder, ref = tiny_folder(tmp_path_factory.mktemp("base"))
    model = llamaherd.load(folder)
    lora = LoRAConfig(rank=4, alpha=8.0, targets=ALL)
    apply_lora(model.net, lora)
    _randomize(model.net)
    out = save_adapter(model.net, model.config, lora, tmp_path_factory.mktemp("adapter"), base=str(folder))
    peft_model = PeftModel.from_pretrained(ref, str(out), is_trainable=True).float()
    return model, out, peft_model, folder


def test_forward_equals_peft(pair):
    model, _, peft_model, _ = pair
    tokens = _tokens()
    with torch.no_grad():
        ours = model.net(tokens)
        theirs = peft_model(input_ids=tokens).logits.float()
        with adapters_disabled(model.net), peft_model.disable_adapter():
            base_ours, base_theirs = model.net(tokens), peft_model(input_ids=tokens).logits.float()
    assert (ours - theirs).abs().max() <= TOL * max(1.0, theirs.abs().max())
    assert (ours - base_ours).abs().max() > 100 * TOL  # the adapter changes the output visibly
    assert (base_ours - base_theirs).abs().max() <= TOL * max(1.0, base_theirs.abs().max())


def test_gradients_equal_peft(pair):
    from llamaherd.checkpoint.transforms import permute_to_hf

    from llamaherd.lora.peft import hf_module_name

    model, _, peft_model, _ = pair
    tokens = _tokens(seed=4)
    labels = _tokens(seed=5)
    model.net.zero_grad()
    peft_model.zero_grad()
    ours = model.net(tokens)
    torch.nn.functional.cross_entropy(ours.flatten(0, 1), labels.flatten()).backward()
    theirs = peft_model(input_ids=tokens).logits.float()
    torch.nn.functional.cross_entropy(theirs.flatten(0, 1), labels.flatten()).backward()
    peft_params = dict(peft_model.named_parameters())
    checked = 0
    for name, m in lora_modules(model.net).items():
        hf = hf_module_name(name, model.config)
        ga, gb = m.lora_A.weight.grad, m.lora_B.weight.grad
        if name.endswith("wq") or name.endswith("wk"):
            gb = permute_to_hf(gb, CONFIG.n_heads if name.endswith("wq") else CONFIG.n_kv_heads)
        pa = peft_params[f"base_model.model.{hf}.lora_A.default.weight"].grad
        pb = peft_params[f"base_model.model.{hf}.lora_B.default.weight"].grad
        scale = max(1.0, pa.abs().max().item(), pb.abs().max().item())
        assert (ga - pa).abs().max() <= TOL * scale, f"{name}.lora_A grad"
        assert (gb - pb).abs().max() <= TOL * scale, f"{name}.lora_B grad"
        assert pb.abs().max() > 0
        checked += 1
    assert checked == len(ALL) * CONFIG.n_layers
    # Only adapter weights train: the base stays frozen.
    assert all(p.grad is None for n, p in model.net.named_parameters() if "lora_" not in n)


def test_peft_saved_adapter_loads_here(pair, tmp_path):
    """The other direction: PEFT's own save_pretrained folder, loaded with llamaherd.load(base, adapter=...)."""
    model, _, peft_model, folder = pair
    peft_model.save_pretrained(tmp_path / "peft")
    again = llamaherd.load(folder)
    load_adapter(again.net, again.config, tmp_path / "peft")
    tokens = _tokens(seed=7)
    with torch.no_grad():
        assert (again.net(tokens) - model.net(tokens)).abs().max() <= TOL


def test_adapter_for_another_base_is_refused(pair, tmp_path):
    _, out, _, _ = pair
    other_cfg = CONFIG.replace(dim=128, n_heads=4)
    folder, _ = tiny_folder(tmp_path / "other", other_cfg)
    other = llamaherd.load(folder)
    with pytest.raises(TrainingError, match="another base model"):
        load_adapter(other.net, other.config, out)
    with pytest.raises(TrainingError, match="not a PEFT adapter folder"):
        load_adapter(other.net, other.config, tmp_path)


def test_merge_equals_adapter(pair):
    model, out, _, folder = pair
    merged = llamaherd.load(folder)
    load_adapter(merged.net, merged.config, out)
    tokens = _tokens(seed=9)
    with torch.no_grad():
        before = merged.net(tokens)
        merge_lora(merged.net)
        after = merged.net(tokens)
    assert not lora_modules(merged.net)
    assert (before - after).abs().max() <= 1e-4


def _lora_over(base, decoded: torch.Tensor, forward_atol: float | None) -> LoRALinear:
    """LoRA over `base` against LoRA over a float Linear holding `decoded`: outputs and gradients (input and
    adapter). `forward_atol` None: 1e-4 of the largest output (a kernel that rounds its activations)."""
    plain = torch.nn.Linear(256, 96, bias=False)
    plain.weight = torch.nn.Parameter(decoded, requires_grad=False)
    a, b = LoRALinear(base, 8, 16.0), LoRALinear(plain, 8, 16.0)
    with torch.no_grad():
        for m in (a, b):
            m.lora_A.weight.copy_(torch.linspace(-1, 1, 8 * 256).view(8, 256))
            m.lora_B.weight.copy_(torch.linspace(-0.5, 0.5, 96 * 8).view(96, 8))
    x1 = torch.randn(3, 5, 256, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = a(x1), b(x2)
    atol = 1e-4 * y2.abs().max().item() if forward_atol is None else forward_atol
    torch.testing.assert_close(y1, y2, atol=atol, rtol=1e-4 if forward_atol is None else 1e-5)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(a.lora_A.weight.grad, b.lora_A.weight.grad, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(a.lora_B.weight.grad, b.lora_B.weight.grad, atol=1e-3, rtol=1e-5)
    return a


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "Q4_K"])
def test_lora_over_packed_ggml_weights(qtype):
    """Forward and gradients through a packed base equal a float Linear holding gguf-py's decoding of the bytes."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    from llamaherd.quant.ggml import GGMLLinear, GGMLWeight
    from llamaherd.quant.quantize import quantize

    torch.manual_seed(0)
    dense = torch.nn.Linear(256, 96, bias=False)
    raw, _ = quantize(dense.weight.detach(), Q[qtype])
    packed = GGMLLinear(256, 96, int(Q[qtype]))
    packed.weight = GGMLWeight(torch.from_numpy(raw), int(Q[qtype]))
    decoded = torch.from_numpy(np.asarray(dequantize(raw, Q[qtype]), dtype=np.float32)).reshape(96, 256)
    _lora_over(packed, decoded, forward_atol=1e-5)


@pytest.mark.parametrize("scheme", ["int8", "int4-g32", "int4-g128"])
def test_lora_over_weight_only_int8_int4(scheme, monkeypatch):
    """Forward and gradients through a weight-only int8/int4 base equal a float Linear holding the published
    decoding of its codes (int8: q * scale per row; int4: (q - 8) * scale + zero per group, gpt-fast's layout)."""
    from llamaherd.native import weight_only as native_wo
    from llamaherd.quant.weight_only import Int4Linear, Int8Linear

    monkeypatch.setattr(native_wo, "INT8_ACTIVATIONS", False)  # int16 codes: the 1e-4 forward bound below

    torch.manual_seed(0)
    weight = torch.randn(96, 256)
    if scheme == "int8":
        base = Int8Linear.from_linear(weight)
        decoded = base.qweight.float() * base.scales.float()[:, None]
    else:
        g = int(scheme.split("-g")[1])
        base = Int4Linear.from_linear(weight, g)
        hi, lo = (base.qweight >> 4).float(), (base.qweight & 15).float()
        q = torch.stack([hi, lo], dim=2).reshape(96, 256)  # byte j: q[2j] high nibble, q[2j+1] low
        scale = base.scales.float().t().repeat_interleave(g, dim=1)  # (K/g, N) -> (N, K)
        zero = base.zeros.float().t().repeat_interleave(g, dim=1)
        decoded = (q - 8) * scale + zero
    assert (decoded - weight).abs().max() < 0.5  # the codes are the weight's, not noise
    # The forward is the weight-only kernel's, held to test_quant_weight_only's tolerance (1e-4 of the largest
    # output); the backward multiplies by the decoded matrix, so the gradients are float32-exact.
    a = _lora_over(base, decoded, forward_atol=None)
    net = torch.nn.Module()
    net.layers = torch.nn.ModuleList([torch.nn.Module()])
    net.layers[0].wq = a
    merge_lora(net)
    torch.testing.assert_close(net.layers[0].wq.weight, decoded + a.delta(), atol=1e-6, rtol=0)


def test_bad_lora_settings():
    with pytest.raises(TrainingError, match="unknown LoRA target"):
        LoRAConfig(targets=("attn",))
    with pytest.raises(TrainingError, match="rank"):
        LoRAConfig(rank=0)
    assert LoRAConfig(targets=("q_proj", "down_proj")).targets == ("wq", "w2")
