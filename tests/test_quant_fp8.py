"""FP8 Hugging Face checkpoints (compressed-tensors, fbgemm_fp8, fp8): logits equal transformers' float32 model
built from the dequantised weights; every scale layout; broken files are typed errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import llamaherd
from llamaherd.errors import CheckpointError
from tests.checkpoint_fixtures import META_EXPERT_KEYS, hf_reference, meta_quantized_folders
from tests.conftest import TINY

E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max: the largest e4m3 value (OCP FP8 spec)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOKENS = torch.tensor([[1, 17, 42, 99, 3, 250, 7, 64], [5, 9, 200, 31, 77, 8, 128, 2]])


# The published rule, restated independently of llamaherd (llm-compressor / compressed-tensors
# `quantize`: q = clamp(w / scale, -448, 448) cast to e4m3, scale = absmax / 448 over the tensor, each output
# row, or each block; transformers' finegrained fp8 stores the same scale as `weight_scale_inv`).
def quantize_e4m3(w: torch.Tensor, strategy: str, block: tuple[int, int] = (16, 32)):
    if strategy == "tensor":
        scale = w.abs().amax().reshape(1) / E4M3_MAX
        full = scale
    elif strategy == "channel":
        scale = w.abs().amax(dim=1, keepdim=True) / E4M3_MAX
        full = scale
    else:  # block (b0 x b1 tiles, the last ones cut at the edge)
        b0, b1 = block
        rows, cols = w.shape
        scale = torch.empty(-(-rows // b0), -(-cols // b1))
        full = torch.empty_like(w)
        for i in range(scale.shape[0]):
            for j in range(scale.shape[1]):
                tile = w[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1]
                scale[i, j] = tile.abs().amax() / E4M3_MAX
                full[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1] = scale[i, j]
    q = (w / full).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale, q.to(torch.float32) * full


def ct_config(strategy: str, activations: str | None) -> dict:
    """quantization_config as llm-compressor writes it for FP8 (FP8_DYNAMIC / FP8 presets)."""
    acts = None if activations is None else {
        "num_bits": 8, "type": "float", "symmetric": True, "strategy": "token" if activations == "dynamic" else "tensor",
        "dynamic": activations == "dynamic"}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": acts,
                                          "weights": {"num_bits": 8, "type": "float", "symmetric": True,
                                                      "strategy": strategy, "dynamic": False}}},
            "ignore": ["lm_head"]}


def fp8_folder(tmp_path, qc: dict, strategy: str, scale_name: str = "weight_scale", extra: str | None = None,
               family: str = "llama3"):
    """transformers' model saved, its linears replaced by e4m3 codes + scales; the reference gets the dequantised
    weights. Returns (folder, reference model)."""
    ref = hf_reference(TINY[family], std=0.1)
    folder = tmp_path / "fp8"
    ref.save_pretrained(folder)
    sd = load_file(folder / "model.safetensors")
    for name in list(sd):
        if name.rsplit(".", 2)[-2] in LINEARS:
            q, scale, w = quantize_e4m3(sd[name], strategy)
            module = name.rsplit(".", 1)[0]
            sd[name], sd[f"{module}.{scale_name}"] = q, scale
            if extra == "input_scale":
                sd[f"{module}.input_scale"] = torch.tensor([0.02])
            elif extra == "input_scale_ub":
                sd[f"{module}.input_scale_ub"] = torch.tensor([1200.0])
            ref.get_parameter(name).data.copy_(w)
    (folder / "model.safetensors").unlink()
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = qc
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, ref


def _assert_logits_match(folder, ref):
    with torch.inference_mode():
        ours = llamaherd.load(folder, dtype=torch.float32).net(TOKENS)
        theirs = ref(input_ids=TOKENS).logits.float()
    rel = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert rel <= 1e-4, f"max relative logit difference {rel:.3g}"


CASES = [("tensor", "static"), ("tensor", "dynamic"), ("channel", "static"), ("channel", "dynamic"),
         ("channel", None), ("block", "dynamic")]


@pytest.mark.parametrize("strategy,acts", CASES)
def test_compressed_tensors_fp8_logits(tmp_path, strategy, acts):
    qc = ct_config(strategy, acts)
    if strategy == "block":
        qc["config_groups"]["group_0"]["weights"]["block_structure"] = [16, 32]
    folder, ref = fp8_folder(tmp_path, qc, strategy, extra="input_scale" if acts == "static" else None)
    _assert_logits_match(folder, ref)


def test_fbgemm_fp8_logits(tmp_path):
    qc = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": ["lm_head"]}
    folder, ref = fp8_folder(tmp_path, qc, "channel", extra="input_scale_ub")
    _assert_logits_match(folder, ref)


def test_finegrained_fp8_logits(tmp_path):
    qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [16, 32]}
    folder, ref = fp8_folder(tmp_path, qc, "block", scale_name="weight_scale_inv", family="llama2")
    _assert_logits_match(folder, ref)


def test_dequantised_weights_take_the_checkpoints_float_dtype(tmp_path):
    """A bf16 checkpoint (as published) is dequantised into bf16, not float32."""
    from llamaherd.checkpoint import read

    folder, _ = fp8_folder(tmp_path, ct_config("channel", "dynamic"), "channel")
    sd = load_file(folder / "model.safetensors")
    sd = {k: v.to(torch.bfloat16) if v.dtype == torch.float32 and not k.endswith("_scale") else v
          for k, v in sd.items()}
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    ckpt = read(folder)
    assert {t.dtype for t in ckpt.state_dict.values()} == {torch.bfloat16}


def test_a_weight_without_its_scale_is_a_typed_error(tmp_path):
    folder, _ = fp8_folder(tmp_path, ct_config("tensor", "dynamic"), "tensor")
    sd = load_file(folder / "model.safetensors")
    del sd["model.layers.0.self_attn.q_proj.weight_scale"]
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="q_proj.weight is torch.float8_e4m3fn but has no weight_scale"):
        llamaherd.load(folder)


def test_a_scale_that_does_not_tile_its_weight_is_a_typed_error(tmp_path):
    folder, _ = fp8_folder(tmp_path, ct_config("channel", "dynamic"), "channel")
    sd = load_file(folder / "model.safetensors")
    sd["model.layers.0.mlp.up_proj.weight_scale"] = torch.ones(7, 1)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="does not tile"):
        llamaherd.load(folder)


@pytest.mark.parametrize("quantize", [None, "fp8"])
def test_a_non_finite_scale_is_a_typed_error(tmp_path, quantize):
    folder, _ = fp8_folder(tmp_path, ct_config("channel", "dynamic"), "channel")
    sd = load_file(folder / "model.safetensors")
    sd["model.layers.1.self_attn.o_proj.weight_scale"][3] = float("nan")
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        llamaherd.load(folder, quantize=quantize)


@pytest.mark.parametrize("qc", [
    {"quant_method": "compressed-tensors", "format": "pack-quantized",
     "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int"}}}},
    {"quant_method": "compressed-tensors", "format": "float-quantized",
     "config_groups": {"g": {"weights": {"num_bits": 4, "type": "float"}}}},
])
def test_other_compressed_tensors_schemes_are_refused_by_name(tmp_path, qc):
    folder, _ = fp8_folder(tmp_path, ct_config("tensor", "dynamic"), "tensor")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = qc
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quant_method 'compressed-tensors'"):
        llamaherd.load(folder)


# -- Meta's Llama 4 FP8 release ------------------------------------------------------------------------------------
# llama-models' own quantizer (quantize_impls.quantize_fp8) runs fbgemm GPU kernels only, so the files are made
# here by the layout its loader reads (llama4/quantization/loader.py convert_to_quantized_model + load_fp8): per
# rank, each routed expert stack transposed to (E, out, in) is quantized row-wise (scale = row absmax / 448,
# fbgemm quantize_fp8_per_row) and fp8_scales_{rank}.pt maps "layers.{i}.feed_forward.experts.w1|w3|w2" to the
# (E, out) scales; the .pth keeps the codes in its usual (E, in, out) layout.
def meta_fp8_folders(tmp_path, shards: int):
    """(FP8 folder, float folder holding the dequantised experts) of test_llama4's tiny model."""
    from tests.test_llama4 import CONFIG as L4

    def quantize(name, w):
        prefix, _, leaf = name.rpartition(".")
        if leaf not in META_EXPERT_KEYS:
            return None
        wt = w.transpose(1, 2)  # (E, out, in)
        scale = wt.abs().amax(-1) / E4M3_MAX  # (E, out)
        code = (wt / scale[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).transpose(1, 2)
        key = f"{prefix}.{META_EXPERT_KEYS[leaf]}"
        return code.contiguous(), code.to(torch.float32) * scale[:, None, :], key, scale

    return meta_quantized_folders(tmp_path, L4, shards, "fp8_scales_{rank}.pt", quantize)


@pytest.mark.parametrize("shards", [1, 2])
def test_meta_llama4_fp8_experts(tmp_path, shards):
    """Each rank's experts are dequantised with that rank's scales (w2 is row-parallel: its scales differ per rank)."""
    from tests.test_llama4 import tokens

    fp8_dir, float_dir = meta_fp8_folders(tmp_path, shards)
    toks = tokens()
    with torch.inference_mode():
        ours = llamaherd.load(fp8_dir, dtype=torch.float32).net(toks)
        ref = llamaherd.load(float_dir, dtype=torch.float32).net(toks)
    rel = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 1e-4, rel


def test_meta_fp8_codes_without_their_scales_are_a_typed_error(tmp_path):
    fp8_dir, _ = meta_fp8_folders(tmp_path, 1)
    (fp8_dir / "fp8_scales_0.pt").unlink()
    with pytest.raises(CheckpointError, match="no fp8_scales"):
        llamaherd.load(fp8_dir)
    torch.save({}, fp8_dir / "int4_scales_0.pt")
    with pytest.raises(CheckpointError, match="int4"):
        llamaherd.load(fp8_dir)
