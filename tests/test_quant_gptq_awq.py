"""GPTQ and AWQ Hugging Face folders: logits equal transformers' float32 model holding the dequantised weights.

Each folder is made here: transformers' random LlamaForCausalLM, every decoder projection quantized by the
simple round-to-nearest quantizer below and packed by the packers below, written from the formats' published
rules (not from llamaherd's code):
  GPTQ (AutoGPTQ `qlinear` pack): qweight int32 (K/p, N), code of input k in bits b*(k % p) of row k // p;
       qzeros int32 (K/G, N/p), packed along the output; zero - 1 stored in the original format ("gptq"),
       zero itself in "gptq_v2"; scales float16 (K/G, N); g_idx (K,) the group of each input (act order:
       the group of input k is its position in the processing order // G).
  AWQ (AutoAWQ GEMM pack): qweight int32 (K, N/8), nibble i of word c holds output 8c + [0,2,4,6,1,3,5,7][i];
       qzeros likewise (K/G, N/8); scales float16 (K/G, N).
  w = scale * (code - zero).
The reference is transformers' LlamaForCausalLM with those dequantised weights (float32). transformers' own
GPTQ/AWQ loaders need optimum with gptqmodel/auto-gptq or autoawq, GPU-oriented packages not installed here.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import llamaherd
from llamaherd import native
from llamaherd.config import ModelConfig
from llamaherd.native import weight_only as native_wo
from llamaherd.errors import CheckpointError
from tests.checkpoint_fixtures import hf_reference, stepwise_logits

# dim 128, hidden 384: every projection's input width takes groups of 32, 64 and 128.
C = ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=128,
                rope_theta=500000.0, max_seq_len=512)
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
SHORT = [1, 17, 42, 99, 3, 250, 7, 64, 128, 5]  # 10 rows: the native one-row kernels
LONG = list(range(3, 240, 11))  # 22 rows: the dequantised-float path


def _to_int32(v: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words (int64) as the int32 the checkpoints store (two's complement)."""
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def _quantize(w: torch.Tensor, bits: int, group: int, sym: bool, g_idx: torch.Tensor, min_zero: int):
    """Round-to-nearest per (group, output row): codes (N, K), float16 scales and int zeros (G, N)."""
    N, K = w.shape
    G = K // group
    top = 2**bits - 1
    scales, zeros = torch.empty(G, N, dtype=torch.float16), torch.empty(G, N, dtype=torch.int64)
    codes = torch.empty(N, K, dtype=torch.int64)
    for g in range(G):
        cols = (g_idx == g).nonzero()[:, 0]
        part = w[:, cols].double()
        if sym:
            s = (part.abs().amax(1) / (2 ** (bits - 1) - 1)).half()
            z = torch.full((N,), 2 ** (bits - 1), dtype=torch.int64)
        else:
            lo, hi = part.amin(1).clamp(max=0), part.amax(1).clamp(min=0)
            s = ((hi - lo) / top).half()
            z = torch.round(-lo / s.double()).to(torch.int64).clamp(min_zero, top)
        scales[g], zeros[g] = s, z
        codes[:, cols] = (torch.round(part / s.double()[:, None]) + z[:, None]).clamp(0, top).to(torch.int64)
    return codes, scales, zeros


def _pack_rows(v: torch.Tensor, bits: int) -> torch.Tensor:
    """(R, C) codes -> (R / p, C) words: row r in bits b*(r % p) of word row r // p."""
    p = 32 // bits
    v = v.reshape(v.shape[0] // p, p, v.shape[1])
    return _to_int32(sum(v[:, j] << (bits * j) for j in range(p)))


def _pack_cols(v: torch.Tensor, bits: int, order=None) -> torch.Tensor:
    """(R, C) codes -> (R, C / p) words: field i of word c holds column p*c + order[i]."""
    p = 32 // bits
    order = order or list(range(p))
    v = v.reshape(v.shape[0], v.shape[1] // p, p)
    return _to_int32(sum(v[:, :, order[i]] << (bits * i) for i in range(p)))


def _pack(method, w, bits, group, sym, desc_act, v2, gen):
    """One projection: (packed tensors, the dequantised float32 weight)."""
    N, K = w.shape
    G = K if group == -1 else group
    if desc_act:  # act order: inputs processed in a permuted order, groups cut along that order
        order = torch.randperm(K, generator=gen)
        g_idx = torch.argsort(order) // G
    else:
        g_idx = torch.arange(K) // G
    min_zero = 1 if method == "gptq" and not v2 else 0  # v1 stores zero - 1: a zero of 0 cannot be stored
    codes, scales, zeros = _quantize(w, bits, G, sym, g_idx, min_zero)
    deq = (scales.double()[g_idx].t() * (codes - zeros[g_idx].t())).float()
    if method == "awq":
        return {"qweight": _pack_cols(codes.t(), 4, AWQ_ORDER), "qzeros": _pack_cols(zeros, 4, AWQ_ORDER),
                "scales": scales}, deq
    stored = zeros - 1 if not v2 else zeros
    return {"qweight": _pack_rows(codes.t().contiguous(), bits), "qzeros": _pack_cols(stored, bits),
            "scales": scales, "g_idx": g_idx.to(torch.int32)}, deq


def _folder(tmp_path, method, bits=4, group=32, sym=False, desc_act=False, v2=False, seed=0):
    ref = hf_reference(C, seed=seed, std=0.05)
    gen = torch.Generator().manual_seed(seed + 1)
    sd = {k: v.detach().clone().contiguous() for k, v in ref.state_dict().items()}
    with torch.no_grad():
        for i in range(C.n_layers):
            for proj in PROJ:
                name = f"model.layers.{i}.{proj}"
                packed, deq = _pack(method, sd.pop(name + ".weight"), bits, group, sym, desc_act, v2, gen)
                sd.update({f"{name}.{leaf}": t.contiguous() for leaf, t in packed.items()})
                ref.get_submodule(name).weight.copy_(deq)
    folder = tmp_path / method
    folder.mkdir()
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = ref.config.to_dict()
    if method == "gptq":
        qc = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": desc_act, "sym": sym,
              "checkpoint_format": "gptq_v2" if v2 else "gptq"}
    else:
        qc = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
    cfg["quantization_config"] = qc
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, ref


VARIANTS = [
    ("gptq", dict(bits=4, group=32, sym=True)),
    ("gptq", dict(bits=4, group=64, sym=False)),
    ("gptq", dict(bits=4, group=32, sym=False, desc_act=True)),
    ("gptq", dict(bits=4, group=128, sym=True, desc_act=True)),
    ("gptq", dict(bits=4, group=-1, sym=False)),
    ("gptq", dict(bits=4, group=64, sym=False, v2=True)),
    ("gptq", dict(bits=8, group=32, sym=False)),
    ("gptq", dict(bits=8, group=128, sym=True, desc_act=True)),
    ("awq", dict(group=32)),
    ("awq", dict(group=128)),
]


@pytest.mark.parametrize("method,kw", VARIANTS, ids=[f"{m}-{'-'.join(f'{k}{v}' for k, v in kw.items())}"
                                                      for m, kw in VARIANTS])
def test_logits_equal_transformers_on_dequantised_weights(tmp_path, method, kw):
    from llamaherd.quant.hf_quantized import PackedLinear

    folder, ref = _folder(tmp_path, method, **kw)
    model = llamaherd.load(folder, dtype=torch.float32)
    assert type(model.net.layers[0].attention.wq) is PackedLinear
    assert type(model.net.layers[1].feed_forward.w2) is PackedLinear
    for tokens in (SHORT, LONG):  # the native kernels (<= 16 rows), then the dequantised float32 path
        with torch.no_grad():
            want = ref(torch.tensor([tokens])).logits[0].float()
        with native.switched_off(native_wo, "INT16_ACTIVATIONS"):  # float32 activations: the exact products
            got = model.logits(tokens)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    with torch.no_grad():
        want = ref(torch.tensor([SHORT])).logits[0].float()
    # int16 activation codes move each activation by at most amax / 65534 of its row
    with native.switched_off(native_wo, "INT8_ACTIVATIONS"):
        got = model.logits(SHORT)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item())
    # the default: 4-bit codes on int8 activation blocks (llama.cpp's Q8_0 rounding, amax / 254 per 32)
    got = model.logits(SHORT)
    torch.testing.assert_close(got, want, rtol=0, atol=4e-2 * want.abs().max().item())


def test_bf16_activations_and_cached_decode(tmp_path):
    """A bf16 model over GPTQ act-order codes: prefill + one-row decode steps give the full forward's logits."""
    folder, ref = _folder(tmp_path, "gptq", bits=4, group=32, desc_act=True)
    model = llamaherd.load(folder, dtype=torch.bfloat16)
    full = model.logits(SHORT)
    torch.testing.assert_close(stepwise_logits(model, SHORT, C), full[3:], rtol=0.05,
                               atol=0.05 * full.abs().max().item())
    with torch.no_grad():
        want = ref(torch.tensor([SHORT])).logits[0].float()
    assert ((full - want).norm() / want.norm()) < 0.02  # bf16 activations against the float32 reference


@pytest.mark.parametrize("qc,match", [
    ({"quant_method": "gptq", "bits": 3, "group_size": 32}, "3 bits"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 0}, "group_size"),
    ({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"}, "GEMM"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 64}, "shapes disagree"),
])
def test_unsupported_or_inconsistent_configs_are_checkpoint_errors(tmp_path, qc, match):
    folder, _ = _folder(tmp_path, qc["quant_method"], group=32)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = qc
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match):
        llamaherd.load(folder)


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_convert_and_quantize_refuse_packed_projections(tmp_path, capsys, fmt):
    """A writer sees only the float tensors of a GPTQ folder: it must refuse, not write a model without them."""
    from llamaherd.cli import main

    folder, _ = _folder(tmp_path, "gptq")
    args = ["convert", str(folder), str(tmp_path / "out"), "--to", fmt] if fmt == "hf" else \
        ["quantize", str(folder), str(tmp_path / "out.gguf"), "--type", "q8_0", "--quiet"]
    assert main(args) != 0
    assert "gptq codes, not float tensors" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.gguf").exists()


def test_the_memory_plan_counts_the_packed_projections(tmp_path):
    from llamaherd.checkpoint import read
    from llamaherd.memory import plan
    from llamaherd.quant.hf_quantized import PackedLinear

    folder, _ = _folder(tmp_path, "gptq")
    ckpt = read(folder)
    floats = sum(t.numel() * 4 for t in ckpt.state_dict.values())  # planned in float32
    packed = [m for m in llamaherd.load(folder, dtype=torch.float32).net.modules() if isinstance(m, PackedLinear)]
    assert packed
    codes = sum(b.numel() * b.element_size() for m in packed for b in m.buffers(recurse=False))
    assert plan(ckpt, dtype=torch.float32).weights == floats + codes
