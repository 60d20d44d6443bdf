"""A GGUF file without a vocabulary (`tokenizer.ggml.model = "none"`) runs on token ids, as in llama.cpp.

The file is written here with gguf-py directly (not our writer): Meta's tensor layout is llama.cpp's for
arch "llama", so only the names change. llama.cpp needs `llama.vocab_size` for such a file (llama-vocab.cpp
adds that many dummy tokens); logits and greedy continuations are compared with llama-cpp-python's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import gguf
import llama_cpp

import llamaherd
from llamaherd.config import ModelConfig
from llamaherd.errors import ChatFormatError, TokenizerError
from llamaherd.tokenizer.gguf_vocab import from_gguf
from tests.conftest import random_model

CONFIG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=160,
                     rope_theta=10000.0, max_seq_len=256, norm_eps=1e-5)
IDS = [5, 17, 3, 90, 42, 0, 11, 64, 64, 2]

# Meta name -> llama.cpp name (llama.cpp `LLM_TENSOR_NAMES` for LLM_ARCH_LLAMA).
_GGUF_NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output",
               "attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
               "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
               "feed_forward.w3": "ffn_up", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}


def _gguf_name(meta: str) -> str:
    base = meta.removesuffix(".weight")
    if base.startswith("layers."):
        _, layer, part = base.split(".", 2)
        return f"blk.{layer}.{_GGUF_NAMES[part]}.weight"
    return f"{_GGUF_NAMES[base]}.weight"


@pytest.fixture(scope="module")
def no_vocab_file(tmp_path_factory):
    c = CONFIG
    path = tmp_path_factory.mktemp("novocab") / "no-vocab-f32.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.hidden_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_dimension_count(c.dim // c.n_heads)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("none")
    for name, t in random_model(c, seed=1, std=0.1).state_dict().items():
        w.add_tensor(_gguf_name(name), t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def llama_cpp_model(no_vocab_file):
    llm = llama_cpp.Llama(str(no_vocab_file), logits_all=True, n_threads=2, n_ctx=64, verbose=False)
    yield llm
    llm.close()


def _llama_cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def test_loads_without_tokenizer_and_logits_match_llama_cpp(no_vocab_file, llama_cpp_model):
    model = llamaherd.load(no_vocab_file)
    assert model.tokenizer is None
    assert llama_cpp_model.n_vocab() == model.config.vocab_size == CONFIG.vocab_size
    ref = _llama_cpp_logits(llama_cpp_model, IDS)
    with torch.no_grad():
        ours = model.logits(IDS).float().numpy()
    assert ours.shape == ref.shape
    # F32 weights; llama.cpp keeps its KV cache in F16 (the same bound as the llama.cpp interop test's f32 row).
    # A wrong tensor layout moves logits by their whole spread (std ~0.5 here).
    diff = np.abs(ours - ref)
    assert diff.max() < 0.02 and diff.mean() < 0.002, (diff.max(), diff.mean())
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_greedy_continuation_of_ids_matches_llama_cpp(no_vocab_file, llama_cpp_model):
    steps = 8
    llm = llama_cpp_model
    llm.reset()
    llm.eval(IDS)
    ref = []
    for _ in range(steps):  # greedy on llama.cpp's own logits of the last position
        ref.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([ref[-1]])
    model = llamaherd.load(no_vocab_file)
    done = model.complete(IDS, temperature=0, max_tokens=steps)
    assert done.token_ids == ref
    assert done.finish_reason == "length"  # no vocabulary, so no end-of-sequence token either
    assert model.generate(IDS, temperature=0, max_tokens=steps) == ""  # runs; there is no text to show
    assert model.generate([IDS, IDS[:4]], temperature=0, max_tokens=2) == ["", ""]


def test_text_prompts_say_there_is_no_tokenizer(no_vocab_file):
    model = llamaherd.load(no_vocab_file)
    for call in (lambda: model.generate("Hello", max_tokens=2), lambda: model.complete("Hello", max_tokens=2)):
        with pytest.raises(ChatFormatError, match="no tokenizer"):
            call()


def test_reading_its_tokenizer_says_the_file_has_no_vocabulary(no_vocab_file):
    with pytest.raises(TokenizerError, match="no vocabulary"):
        from_gguf(no_vocab_file)
