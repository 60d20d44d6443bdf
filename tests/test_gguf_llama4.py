"""Llama 4 as GGUF (llama.cpp arch "llama4"): llama.cpp loads what we write and agrees on the logits; read back.

Oracles nobody here wrote: llama.cpp itself (llama-cpp-python) for the logits and the quantization mix
(`llama_model_quantize` on our F32 file), gguf-py for the bytes (its reader and reference Q8_0 quantizer).

The tiny configs are shaped as llama.cpp's llama4 can state them (checkpoint/llama4.py `check_gguf`): it fixes
chunks of 8192, NoPE in every 4th layer and temperature tuning (floor 8192, scale 0.1) rather than reading them,
so four layers give dense layers (0, 2), MoE layers (1, 3) and a NoPE layer (3). Widths are 32-multiples so that
Q8_0 applies to every matrix (llama.cpp falls back to F16 for rows its blocks do not divide).
"""

from __future__ import annotations

import ctypes
import logging

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import llamaherd
from llamaherd.checkpoint.gguf import read as gguf_read
from llamaherd.checkpoint.gguf_write import write
from llamaherd.cli import main as herd
from llamaherd.config import ModelConfig, MoEConfig, RopeScaling
from llamaherd.errors import CheckpointError
from llamaherd.model import build
from tests.gguf_write_fixtures import checkpoint, dequantized, read_field, read_tensors

llama_cpp = pytest.importorskip("llama_cpp")

# Scout's shape: chunked RoPE layers, a NoPE layer, QK-norm, top-1 routing, Scout's rope scaling
# (factor 16, low = high = 1, original 8192: llama.cpp gets it as the rope_freqs tensor), separate output.
SCOUT_LIKE = ModelConfig(
    arch="llama4", dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=128,
    rope_theta=500000.0, max_seq_len=131072, norm_eps=1e-5,
    rope_scaling=RopeScaling(kind="llama3", factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
                             original_max_position=8192),
    moe=MoEConfig(num_experts=4, top_k=1, hidden_dim=64, interleave_step=2),
    attention_chunk_size=8192, nope_layer_interval=4, use_qk_norm=True, attn_temperature_tuning=True,
    floor_scale=8192.0, attn_scale=0.1,
)
# Every layer MoE (Scout's interleave), top-2 routing, tied embeddings (llama.cpp reuses token_embd), no scaling.
ALL_MOE = SCOUT_LIKE.replace(rope_scaling=None, tie_embeddings=True,
                             moe=MoEConfig(num_experts=4, top_k=2, hidden_dim=64, interleave_step=1))
CONFIGS = {"scout-like": SCOUT_LIKE, "all-moe": ALL_MOE}
IDS = [1, 5, 17, 200, 3, 99, 45, 250, 128, 7, 7, 31, 64, 2, 190, 77]

# (max, mean) |logit difference|, llama.cpp vs us, as tests/test_llamacpp_interop.py allows for arch "llama"
# (llama.cpp keeps its KV cache in F16 and quantizes activations to 8 bits against Q8_0 weights).
TOLERANCE = {"f32": (0.02, 0.002), "q8_0": (0.15, 0.02)}
LLAMA_FTYPE = {"q8_0": 7, "q4_k_m": 15}  # gguf-py LlamaFileType, for llama_model_quantize

# GGUF name -> Meta name and whether GGUF stores it transposed, spelled out here from llama.cpp's llama4
# tensor list (gguf-py constants.py MODEL_ARCH.LLAMA4; shapes from src/models/llama4.cpp).
_PARTS = {
    "attn_norm": ("attention_norm.weight", False), "attn_q": ("attention.wq.weight", False),
    "attn_k": ("attention.wk.weight", False), "attn_v": ("attention.wv.weight", False),
    "attn_output": ("attention.wo.weight", False), "ffn_norm": ("ffn_norm.weight", False),
    "ffn_gate": ("feed_forward.w1.weight", False), "ffn_up": ("feed_forward.w3.weight", False),
    "ffn_down": ("feed_forward.w2.weight", False), "ffn_gate_inp": ("feed_forward.router_DE", True),
    "ffn_gate_exps": ("feed_forward.experts.moe_w_in_eD_F", True),
    "ffn_up_exps": ("feed_forward.experts.moe_w_swiglu_eD_F", True),
    "ffn_down_exps": ("feed_forward.experts.moe_w_out_eF_D", True),
    "ffn_gate_shexp": ("feed_forward.shared_expert.w1.weight", False),
    "ffn_up_shexp": ("feed_forward.shared_expert.w3.weight", False),
    "ffn_down_shexp": ("feed_forward.shared_expert.w2.weight", False),
}
_TOP = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
        "output.weight": "output.weight"}


def meta_state(path) -> dict[str, torch.Tensor]:
    """The file's tensors decoded by gguf-py, under Meta's names and layouts (independent of our reader)."""
    out = {}
    for name, t in dequantized(path).items():
        if name == "rope_freqs.weight":
            continue
        if name in _TOP:
            out[_TOP[name]] = t
            continue
        _, layer, part, _ = name.split(".")
        meta, transposed = _PARTS[part]
        out[f"layers.{layer}.{meta}"] = t.transpose(-1, -2).contiguous() if transposed else t
    return out


def our_logits(config: ModelConfig, state: dict[str, torch.Tensor], ids: list[int]) -> np.ndarray:
    net = build(config, device="meta")
    net.load_state_dict(state, strict=True, assign=True)
    with torch.no_grad():
        return net.eval()(torch.tensor([ids]))[0].numpy()


def llama_cpp_logits(path, ids: list[int], n_ctx: int = 64) -> np.ndarray:
    llm = llama_cpp.Llama(str(path), logits_all=True, n_threads=2, verbose=False, n_ctx=n_ctx)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def assert_agree(ours: np.ndarray, ref: np.ndarray, qtype: str) -> None:
    max_tol, mean_tol = TOLERANCE[qtype]
    diff = np.abs(ours - ref)
    assert ref.std() > 0.3  # logits that move: a wrong layout would differ by about this much
    assert diff.max() < max_tol and diff.mean() < mean_tol, (diff.max(), diff.mean(), ref.std())
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    """(config, checkpoint, its F32 GGUF file)."""
    config = CONFIGS[request.param]
    ckpt = checkpoint(config, std=0.1, seed=0)
    return config, ckpt, write(ckpt, tmp_path_factory.mktemp("llama4") / f"{request.param}-f32.gguf", qtype="f32")


def test_f32_file_runs_in_llama_cpp_and_reads_back(case):
    config, ckpt, path = case
    reader = gguf.GGUFReader(path)
    assert read_field(reader, "general.architecture") == "llama4"
    assert read_field(reader, "llama4.expert_count") == config.moe.num_experts
    assert read_field(reader, "llama4.expert_used_count") == config.moe.top_k
    assert read_field(reader, "llama4.expert_feed_forward_length") == config.moe.hidden_dim
    assert read_field(reader, "llama4.interleave_moe_layer_step") == config.moe.interleave_step
    assert "llama4.attention.sliding_window" not in reader.fields  # absent: llama.cpp's fixed chunks of 8192
    assert ("rope_freqs.weight" in read_tensors(path)) == (config.rope_scaling is not None)
    # gguf-py's view of the file, mapped by this test's own table, is the state dict we wrote
    theirs = meta_state(path)
    assert set(theirs) == set(ckpt.state_dict)
    for name, t in ckpt.state_dict.items():
        assert torch.equal(theirs[name], t), name
    # our reader: the same config and tensors
    back = gguf_read(path)
    assert back.config == config
    assert set(back.state_dict) == set(ckpt.state_dict)
    for name, t in ckpt.state_dict.items():
        assert torch.equal(back.state_dict[name], t), name
    # llama.cpp runs it as we do
    ref = llama_cpp_logits(path, IDS)
    assert_agree(our_logits(config, ckpt.state_dict, IDS), ref, "f32")
    assert_agree(llamaherd.load(path).logits(IDS).numpy(), ref, "f32")


def test_q8_0_file_is_gguf_pys_quantization_and_runs_in_llama_cpp(case, tmp_path):
    config, ckpt, f32_path = case
    path = write(ckpt, tmp_path / "q8.gguf", qtype="q8_0")
    theirs, ours = read_tensors(f32_path), read_tensors(path)
    assert set(ours) == set(theirs)
    for name, (qtype, data) in ours.items():
        if theirs[name][1].ndim == 1 or ".ffn_gate_inp." in name:  # norms and routers stay F32, as in llama.cpp
            assert qtype == Q.F32 and np.array_equal(data, theirs[name][1]), name
        else:  # matrices and the 3-D expert stacks, row by row
            assert qtype == Q.Q8_0 and np.array_equal(data, gguf.quants.quantize(theirs[name][1], Q.Q8_0)), name
    # read back: what gguf-py decodes, in Meta's layout (experts and router decoded on load)
    decoded = meta_state(path)
    back = gguf_read(path)
    assert back.config == config
    for name, t in back.state_dict.items():
        t = t.dequantize() if hasattr(t, "dequantize") else t
        assert torch.equal(t.float(), decoded[name]), name
        torch.testing.assert_close(t.float(), ckpt.state_dict[name], atol=0.1 * 4 / 127, rtol=0)  # |w| < ~4 std
    ref = llama_cpp_logits(path, IDS)
    assert_agree(our_logits(config, decoded, IDS), ref, "q8_0")
    assert_agree(llamaherd.load(path).logits(IDS).numpy(), ref, "q8_0")


def test_cli_converts_hf_folder_and_requantizes(tmp_path, caplog):
    """`herd convert hf-folder --to gguf`, `herd quantize` of that file, `--to hf` again: llama.cpp agrees."""
    from llamaherd.checkpoint.save import save

    ckpt = checkpoint(SCOUT_LIKE, std=0.1, seed=1)
    folder = save(ckpt, tmp_path / "hf", "hf")
    f32 = tmp_path / "f32.gguf"
    assert herd(["convert", str(folder), str(f32), "--to", "gguf", "--dtype", "f32"]) == 0
    q8 = tmp_path / "q8.gguf"
    assert herd(["quantize", str(f32), str(q8), "--type", "q8_0", "--quiet"]) == 0
    with caplog.at_level(logging.WARNING):  # requantizing Q8_0 says once that its rounding error stays
        q8_again = write(gguf_read(q8), tmp_path / "q8-again.gguf", qtype="q8_0")
    assert any("dequantizing" in r.getMessage() for r in caplog.records)
    assert gguf_read(q8_again).config == gguf_read(f32).config == SCOUT_LIKE
    ref = llama_cpp_logits(q8, IDS)
    from_q8 = llamaherd.load(q8).logits(IDS)
    assert_agree(from_q8.numpy(), ref, "q8_0")
    # and back out of GGUF: a Hugging Face folder holding the Q8_0 weights as gguf-py decodes them
    hf_again = tmp_path / "hf-again"
    assert herd(["convert", str(q8), str(hf_again), "--to", "hf", "--dtype", "f32"]) == 0
    again = llamaherd.load(hf_again)
    want = our_logits(SCOUT_LIKE, meta_state(q8), IDS)
    torch.testing.assert_close(again.logits(IDS).numpy(), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("change, message", [
    (dict(moe=None), "needs experts"),
    (dict(attention_chunk_size=16), "chunk size 16"),
    (dict(nope_layer_interval=3), "NoPE interval 3"),
    (dict(attention_chunk_size=None, nope_layer_interval=None, attn_temperature_tuning=False), "chunk size None"),
    (dict(floor_scale=4.0), "temperature tuning"),
    (dict(use_qk_norm=False), "use_qk_norm=False"),
])
def test_what_llama_cpp_cannot_state_is_refused(change, message, tmp_path):
    ckpt = checkpoint(SCOUT_LIKE.replace(**change), std=0.1)
    dst = tmp_path / "x.gguf"
    with pytest.raises(CheckpointError, match=message):
        write(ckpt, dst, qtype="f32")
    assert not dst.exists()


def test_vision_tower_is_left_out_with_a_warning(tmp_path, caplog):
    ckpt = checkpoint(ALL_MOE, std=0.1)
    ckpt.state_dict["vision_projection.weight"] = torch.zeros(64, 32)
    with caplog.at_level(logging.WARNING):
        path = write(ckpt, tmp_path / "text.gguf", qtype="f32")
    assert any("mmproj" in r.getMessage() for r in caplog.records)
    assert not any(n.startswith("v") for n in read_tensors(path))


# -- slow: llama.cpp's own quantizer picks the same per-tensor types, and long context ----------------------
KQ = SCOUT_LIKE.replace(dim=256, hidden_dim=512, n_heads=4, n_kv_heads=2, rope_scaling=None,
                        moe=MoEConfig(num_experts=8, top_k=1, hidden_dim=128, interleave_step=2))


def _llama_cpp_quantize(src, dst, ftype: str):
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPE[ftype]
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("experts", [4, 8])
@pytest.mark.parametrize("ftype", sorted(LLAMA_FTYPE))
def test_quantization_mix_is_llama_cpps(experts, ftype, tmp_path):
    """Routers kept F32, 3-D experts quantized, every ffn_down* by its block, 8-expert attn_v/attn_k rules."""
    config = KQ.replace(moe=MoEConfig(num_experts=experts, top_k=1, hidden_dim=128, interleave_step=2))
    ckpt = checkpoint(config, std=0.05, seed=2)
    f32 = write(ckpt, tmp_path / "f32.gguf", qtype="f32")
    theirs = {n: t for n, (t, _) in read_tensors(_llama_cpp_quantize(f32, tmp_path / "theirs.gguf", ftype)).items()}
    ours = {n: t for n, (t, _) in read_tensors(write(ckpt, tmp_path / "ours.gguf", qtype=ftype)).items()}
    assert ours == theirs


@pytest.mark.slow
def test_chunks_and_temperature_beyond_8192_positions(tmp_path):
    """Past position 8192 llama.cpp's fixed chunking and NoPE temperature act; the last logits still agree."""
    ckpt = checkpoint(SCOUT_LIKE, std=0.1, seed=3)
    path = write(ckpt, tmp_path / "f32.gguf", qtype="f32")
    ids = torch.randint(0, SCOUT_LIKE.vocab_size, (8192 + 64,), generator=torch.Generator().manual_seed(0)).tolist()
    ref = llama_cpp_logits(path, ids, n_ctx=8192 + 128)[-64:]
    ours = llamaherd.load(path).logits(ids)[-64:].numpy()
    assert_agree(ours, ref, "f32")
    # Measured on these weights: max 0.003 / mean 0.0003 as is; chunks of 16384 instead move the logits by their
    # whole spread, and leaving out the NoPE temperature by mean 0.0025, so the mean is held tighter here.
    assert np.abs(ours - ref).mean() < 0.001


LLAMA4_TEXTS = ("The quick brown fox; 12345 times, über café!", "  HELLOWorld's\n\n\ttabs 3.14159 a/b/c",
                "日本語のテキスト 🦙")


@pytest.fixture(scope="module")
def llama4_vocab_file(tmp_path_factory):
    """A tiny model with Meta's Llama 4 vocabulary (202,048 tokens, pre-tokenizer "llama4"); ~10 s to write."""
    from llamaherd.tokenizer import Tokenizer

    tok = Tokenizer.llama4()
    ckpt = checkpoint(SCOUT_LIKE.replace(vocab_size=tok.vocab_size, tie_embeddings=True), std=0.1, tokenizer=tok)
    return tok, write(ckpt, tmp_path_factory.mktemp("vocab") / "llama4-vocab.gguf", qtype="f32")


@pytest.mark.slow
def test_llama_cpp_tokenizes_the_llama4_vocabulary_like_us(llama4_vocab_file):
    tok, path = llama4_vocab_file
    assert read_field(gguf.GGUFReader(path), "tokenizer.ggml.pre") == "llama4"
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        for text in LLAMA4_TEXTS:
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
    finally:
        llm.close()


@pytest.mark.slow
def test_our_reader_reads_the_llama4_vocabulary(llama4_vocab_file):
    tok, path = llama4_vocab_file
    ours = gguf_read(path).tokenizer
    for text in LLAMA4_TEXTS:
        assert ours.encode(text) == tok.encode(text), text
        assert ours.decode(ours.encode(text)) == text


@pytest.mark.parametrize("key, value", [("llama4.expert_count", 0), ("llama4.expert_used_count", 5),
                                        ("llama4.interleave_moe_layer_step", 0),
                                        ("llama4.expert_feed_forward_length", -1)])
def test_unusable_expert_metadata_is_a_gguf_error(case, key, value):
    from llamaherd.checkpoint.gguf import config_from_metadata
    from llamaherd.errors import GGUFError
    from llamaherd.gguf_file import open_gguf

    _, _, path = case
    header, mm = open_gguf(path)
    mm.close()
    with pytest.raises(GGUFError, match="not a usable mixture of experts"):
        config_from_metadata({**header.metadata, key: value}, header.tensors, path)
