"""FP8 kept as e4m3 and multiplied by torch._scaled_mm (quant/fp8_mm.py): an FP8 checkpoint's own codes and a float
model quantized at load give the logits of a float32 reference that applies the same published FP8 rules to its
activations; on CUDA (skipped without one) the same model agrees within bf16 rounding."""

from __future__ import annotations

import pytest
import torch

import llamaherd
from llamaherd.errors import CheckpointError
from llamaherd.quant.fp8_mm import Fp8Linear
from llamaherd.quant.weight_only import QuantizeError
from tests.checkpoint_fixtures import hf_reference
from tests.conftest import TINY
from tests.test_quant_fp8 import E4M3_MAX, LINEARS, TOKENS, ct_config, fp8_folder, quantize_e4m3


# The activation rules, restated independently of llamaherd: vLLM's scaled_fp8_quant / fbgemm's
# quantize_fp8_per_row compute scale = amax / 448 per token row (amax clamped to activation_scale_ub when
# given), or use the checkpoint's static input_scale; q = clamp(x / scale, -448, 448) cast to e4m3, in float32.
def fake_quantized(x: torch.Tensor, input_scale: float | None = None, ub: float | None = None) -> torch.Tensor:
    x32 = x.to(torch.float32)
    if input_scale is not None:
        s = torch.tensor(input_scale, dtype=torch.float32)
    else:
        amax = x32.abs().amax(dim=-1, keepdim=True)
        s = (amax.clamp(max=ub) if ub is not None else amax) / E4M3_MAX
    return ((x32 / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32) * s).to(x.dtype)


def quantize_reference_inputs(ref, **rule) -> None:
    for name, module in ref.named_modules():
        if name.rsplit(".", 1)[-1] in LINEARS:
            module.register_forward_pre_hook(lambda m, args: (fake_quantized(args[0], **rule),))


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max()).item()


def fp8_modules(model) -> dict[str, Fp8Linear]:
    return {n: m for n, m in model.net.named_modules() if isinstance(m, Fp8Linear)}


def _logits(folder, **kw) -> torch.Tensor:
    with torch.inference_mode():
        return llamaherd.load(folder, dtype=torch.float32, **kw).net(TOKENS)


@pytest.mark.parametrize("strategy,acts", [("tensor", "static"), ("tensor", "dynamic"), ("channel", "static"),
                                           ("channel", "dynamic"), ("channel", None)])
def test_compressed_tensors_codes_run_as_stored(tmp_path, strategy, acts):
    folder, ref = fp8_folder(tmp_path, ct_config(strategy, acts), strategy,
                             extra="input_scale" if acts == "static" else None)
    model = llamaherd.load(folder, dtype=torch.float32, quantize="fp8")
    mods = fp8_modules(model)
    assert len(mods) == 7 * TINY["llama3"].n_layers
    # the file's own bytes, not a requantization (wv: not permuted between HF and Meta layouts)
    from safetensors.torch import load_file
    stored = load_file(folder / "model.safetensors")["model.layers.1.self_attn.v_proj.weight"]
    assert torch.equal(mods["layers.1.attention.wv"].weight.view(torch.uint8), stored.view(torch.uint8))
    quantize_reference_inputs(ref, input_scale=0.02 if acts == "static" else None)
    with torch.inference_mode():
        ours, theirs = model.net(TOKENS), ref(input_ids=TOKENS).logits
    assert relative_error(ours, theirs) <= 1e-4


def test_fbgemm_codes_clamp_activations_to_the_upper_bound(tmp_path):
    qc = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": ["lm_head"]}
    folder, ref = fp8_folder(tmp_path, qc, "channel", extra="input_scale_ub")
    ub = 0.05  # below the activations' amax, so the clamp changes the result
    from safetensors.torch import load_file, save_file
    sd = load_file(folder / "model.safetensors")
    sd = {k: (torch.tensor([ub]) if k.endswith("input_scale_ub") else t) for k, t in sd.items()}
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    ours = _logits(folder, quantize="fp8")
    quantize_reference_inputs(ref, ub=ub)
    with torch.inference_mode():
        clamped = ref(input_ids=TOKENS).logits
    assert relative_error(ours, clamped) <= 1e-4
    assert relative_error(_logits(folder), clamped) > 1e-3  # the dequantised default does not clamp: a real change


def test_block_scaled_files_and_the_cpu_default_stay_dequantised(tmp_path):
    qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [16, 32]}
    folder, ref = fp8_folder(tmp_path, qc, "block", scale_name="weight_scale_inv", family="llama2")
    assert not fp8_modules(llamaherd.load(folder, dtype=torch.float32))  # CPU default: dequantised
    model = llamaherd.load(folder, dtype=torch.float32, quantize="fp8")  # asked for: requantized per channel
    assert fp8_modules(model)
    requantize_reference(ref)
    with torch.inference_mode():
        assert relative_error(model.net(TOKENS), ref(input_ids=TOKENS).logits) <= 1e-4


def requantize_reference(ref) -> None:
    """The reference's projections quantized by the published per-channel rule, its inputs per token."""
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.rsplit(".", 2)[-2] in LINEARS:
                p.copy_(quantize_e4m3(p, "channel")[2])
    quantize_reference_inputs(ref)


def test_a_float_model_quantized_at_load(tmp_path):
    ref = hf_reference(TINY["llama3"], std=0.1)
    ref.save_pretrained(tmp_path / "bf")
    ours = _logits(tmp_path / "bf", quantize="fp8")
    requantize_reference(ref)
    with torch.inference_mode():
        assert relative_error(ours, ref(input_ids=TOKENS).logits) <= 1e-4


def test_the_memory_plan_counts_one_byte_per_fp8_weight(tmp_path):
    from llamaherd.checkpoint import read
    from llamaherd.memory import plan

    ref = hf_reference(TINY["llama3"], std=0.1)
    ref.save_pretrained(tmp_path / "bf")
    ckpt = read(tmp_path / "bf")
    projections = sum(p.numel() for n, p in ref.named_parameters() if n.rsplit(".", 2)[-2] in LINEARS)
    rows = sum(p.shape[0] for n, p in ref.named_parameters() if n.rsplit(".", 2)[-2] in LINEARS)
    f32 = plan(ckpt, dtype=torch.float32).weights
    fp8 = plan(ckpt, dtype=torch.float32, quantize="fp8").weights
    assert f32 - fp8 == projections * 3 - rows * 4


def test_fp8_linear_refuses_widths_and_dtypes_it_cannot_run():
    with pytest.raises(QuantizeError, match="multiples of 16"):
        Fp8Linear(torch.zeros(24, 40).to(torch.float8_e4m3fn), torch.ones(24))
    with pytest.raises(QuantizeError, match="float8_e4m3fn"):
        Fp8Linear(torch.zeros(32, 32, dtype=torch.int8), torch.ones(32))
    with pytest.raises(QuantizeError, match="one per row"):
        Fp8Linear(torch.zeros(32, 32).to(torch.float8_e4m3fn), torch.ones(3))


def test_a_kept_code_of_the_wrong_shape_is_a_typed_error(tmp_path):
    folder, _ = fp8_folder(tmp_path, ct_config("channel", "dynamic"), "channel")
    from safetensors.torch import load_file, save_file
    sd = load_file(folder / "model.safetensors")
    name = "model.layers.0.mlp.up_proj"
    sd[f"{name}.weight"] = sd[f"{name}.weight"][:16].contiguous()
    sd[f"{name}.weight_scale"] = sd[f"{name}.weight_scale"][:16].contiguous()
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError):
        llamaherd.load(folder, quantize="fp8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_same_codes_on_cuda(tmp_path):
    from llamaherd.quant.fp8_mm import cuda_fp8
    if not cuda_fp8("cuda"):
        pytest.skip("this CUDA device has no FP8 tensor cores (compute capability < 8.9)")
    folder, _ = fp8_folder(tmp_path, ct_config("channel", "dynamic"), "channel")
    cpu = _logits(folder, quantize="fp8")
    model = llamaherd.load(folder, dtype=torch.bfloat16, device="cuda")  # kept by default on an FP8 GPU
    assert fp8_modules(model)
    with torch.inference_mode():
        gpu = model.net(TOKENS.cuda()).float().cpu()
    assert relative_error(gpu, cpu) <= 2e-2  # bf16 activations and outputs against float32


# -- Llama 4 experts -----------------------------------------------------------------------------------------------

def reference_experts(experts, slices: int, ub: float | None) -> None:
    """An Experts module (float weights) made to apply the FP8 activation rule as Meta's loader does on `slices`
    model-parallel ranks: w1 / w3 on the whole input, w2 on each rank's slice of the hidden width on its own
    (llama-models quantize_impls ffn_swiglu_dynamic per rank, then the all-reduce)."""
    cut = experts.moe_w_out_eF_D.shape[1] // slices

    def forward(x, e):
        xq = fake_quantized(x, ub=ub)
        h = torch.nn.functional.silu(xq @ experts.moe_w_in_eD_F[e]) * (xq @ experts.moe_w_swiglu_eD_F[e])
        return sum(fake_quantized(h[:, r * cut:(r + 1) * cut], ub=ub) @ experts.moe_w_out_eF_D[e][r * cut:(r + 1) * cut]
                   for r in range(slices))
    experts.forward = forward


def _experts_modules(net):
    from llamaherd.model.moe import Experts
    return [m for m in net.modules() if type(m) is Experts]


@pytest.mark.parametrize("shards", [1, 2])
def test_meta_llama4_fp8_experts_run_as_stored(tmp_path, shards):
    from llamaherd.quant.fp8_mm import Fp8Experts
    from tests.test_llama4 import tokens
    from tests.test_quant_fp8 import meta_fp8_folders

    fp8_dir, float_dir = meta_fp8_folders(tmp_path, shards)
    model = llamaherd.load(fp8_dir, dtype=torch.float32, quantize="fp8")
    assert len([m for m in model.net.modules() if isinstance(m, Fp8Experts)]) == 2
    ref = llamaherd.load(float_dir, dtype=torch.float32)  # the same experts, dequantised per rank
    for experts in _experts_modules(ref.net):
        reference_experts(experts, shards, ub=1200.0)  # Meta's fp8_activation_scale_ub
    toks = tokens()
    with torch.inference_mode():
        assert relative_error(model.net(toks), ref.net(toks)) <= 1e-4


def test_llama4_experts_quantized_at_load(tmp_path):
    from llamaherd.checkpoint import meta_pth
    from llamaherd.checkpoint.base import Checkpoint
    from llamaherd.quant.fp8_mm import Fp8Experts
    from tests.conftest import random_model
    from tests.test_llama4 import CONFIG, tokens

    src = meta_pth.write(Checkpoint(config=CONFIG, state_dict=random_model(CONFIG, seed=0).state_dict(),
                                    source=tmp_path), tmp_path / "bf", shards=1)
    model = llamaherd.load(src, dtype=torch.float32, quantize="fp8")
    assert any(isinstance(m, Fp8Experts) for m in model.net.modules())
    ref = llamaherd.load(src, dtype=torch.float32)
    with torch.no_grad():
        for experts in _experts_modules(ref.net):
            for p in experts.parameters():  # per expert and output column of Meta's (E, in, out) layout
                scale = p.abs().amax(dim=1, keepdim=True) / E4M3_MAX
                p.copy_((p / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32) * scale)
            reference_experts(experts, 1, ub=None)
        for name, module in ref.net.named_modules():
            if isinstance(module, torch.nn.Linear) and name.split(".")[-1] != "output":
                module.weight.copy_(quantize_e4m3(module.weight, "channel")[2])
                module.register_forward_pre_hook(lambda m, args: (fake_quantized(args[0]),))
    toks = tokens()
    with torch.inference_mode():
        assert relative_error(model.net(toks), ref.net(toks)) <= 1e-4


# -- against compressed-tensors itself -------------------------------------------------------------------------------
# transformers with the compressed-tensors package (the format's owner, llm-compressor's runtime) decompresses the
# weights and fake-quantizes each Linear's input by the file's input_activations on the CPU: its logits are the
# format's own reading of the file, with no llamaherd code on that side.

def compressed_tensors_logits(folder) -> torch.Tensor:
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.inference_mode():
        return model(input_ids=TOKENS).logits


@pytest.mark.parametrize("strategy,acts", [("tensor", "static"), ("tensor", "dynamic"), ("channel", "static"),
                                           ("channel", "dynamic")])
def test_kept_codes_equal_compressed_tensors_own_forward(tmp_path, strategy, acts):
    folder, _ = fp8_folder(tmp_path, ct_config(strategy, acts), strategy,
                           extra="input_scale" if acts == "static" else None)
    assert relative_error(_logits(folder, quantize="fp8"), compressed_tensors_logits(folder)) <= 1e-5


@pytest.mark.parametrize("family", ["llama3", "gemma3"])
def test_herd_quantize_fp8_writes_a_folder_compressed_tensors_reads(tmp_path, family):
    from safetensors.torch import load_file

    from llamaherd.cli import main

    if family == "gemma3":
        from tests.test_gemma3 import VARIANTS, hf_model
        ref = hf_model(VARIANTS["plain"])
    else:
        ref = hf_reference(TINY[family], std=0.1)
    ref.save_pretrained(tmp_path / "bf")
    assert main(["quantize", str(tmp_path / "bf"), str(tmp_path / "fp8"), "--type", "fp8", "--quiet"]) == 0
    written = load_file(tmp_path / "fp8" / "model.safetensors")
    source = load_file(tmp_path / "bf" / "model.safetensors")
    name = next(k for k in source if k.endswith("self_attn.q_proj.weight"))  # HF's row order (permuted back)
    codes, scale, _ = quantize_e4m3(source[name], "channel")  # the published rule, on the source weights
    assert torch.equal(written[name].view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(written[name.replace(".weight", ".weight_scale")], scale)
    ours = _logits(tmp_path / "fp8", quantize="fp8")
    assert torch.equal(ours, _logits(tmp_path / "bf", quantize="fp8"))  # the same codes as quantizing at load
    assert relative_error(ours, compressed_tensors_logits(tmp_path / "fp8")) <= 1e-5
