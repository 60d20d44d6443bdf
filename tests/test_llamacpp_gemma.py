"""The default model (Gemma 3 270M, Q4_K_M GGUF) against llama.cpp and against transformers (slow)."""

from __future__ import annotations

import pytest
import torch

from llamaherd import store

from .llamacpp_gemma_compare import GREEDY_TOKENS, PROMPTS, compare, dequantized

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_gguf(tmp_path_factory):
    """The default model assembled from its installed package into a fresh store (never the user's)."""
    pytest.importorskip(store.PACKAGED[store.DEFAULT_MODEL].module, reason="install llamaherd[models]")
    mp = pytest.MonkeyPatch()
    mp.setenv("LLAMAHERD_HOME", str(tmp_path_factory.mktemp("herd")))
    yield store.default_model(progress=lambda *_: None)
    mp.undo()


def test_default_model_matches_its_preset(default_gguf):
    import llamaherd
    from llamaherd import presets

    model = llamaherd.load(default_gguf)
    want = presets.get("gemma-3-270m").config
    got = model.config
    # The reader unties a quantized embedding into a separate (shared-bytes) output projection.
    assert got.replace(tie_embeddings=True, norm_eps=1e-6) == want


@pytest.mark.parametrize("runtime,int8", [(False, False), (True, False), (True, True)],
                         ids=["float-copy", "runtime", "runtime-int8"])
def test_agrees_with_llamacpp(default_gguf, runtime, int8, monkeypatch):
    """Both our exact float arithmetic on the decoded weights and the runtime users get (packed weights, the
    fast kernels' activation precision: bf16 prefill products, native/ggml_kernels.py) stay as close to
    llama.cpp as the float copy was measured to be."""
    pytest.importorskip("llama_cpp", reason="install llamaherd[interop] (llama-cpp-python)")
    from llamaherd.native import ggml_kernels

    # "runtime" pins float activations for the few-row products; "runtime-int8" is the default (int8
    # activations quantized as llama.cpp does, native/ggml_q8.c). Int8 codes turn ulp-level differences in
    # the activations into whole code steps, so which prompts' 16-token greedy continuations stay identical
    # to llama.cpp's moved from run to run as unrelated float code changed (measured 6/9, 4/9, 3/9 prompts on
    # the same kernels; float activations: 6/9 each time): that count is checked on the float runtime only.
    monkeypatch.setattr(ggml_kernels, "INT8_ACTIVATIONS", int8)
    rep = compare(default_gguf, log=lambda *_: None, runtime=runtime)
    print(rep.summary())
    assert rep.tokens_equal == len(PROMPTS)
    assert rep.top1_rate >= 0.95
    # Measured (float copy): max 1.31, mean 0.146; KL mean 0.0019 nats (llama.cpp quantizes activations to 8 bits
    # for its quantized matmuls and stores the KV cache in f16; transformers on the same weights agrees with us
    # to 1e-4, see below). The runtime with bf16 prefill products: max 1.42, mean 0.155, KL mean 0.0019.
    diffs = torch.tensor(rep.top10_diffs)
    assert diffs.mean() < 0.25 and diffs.max() < 2.5
    assert sum(rep.kl) / len(rep.kl) < 0.01
    if not int8:
        assert sum(n >= GREEDY_TOKENS for n in rep.greedy_equal) > len(PROMPTS) / 2


def test_agrees_with_transformers_on_the_same_gguf(default_gguf):
    """transformers reads the GGUF itself (gguf-py dequantization, its own Gemma norm offset) into Gemma3ForCausalLM."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    import llamaherd

    meta = load_gguf_checkpoint(str(default_gguf), return_tensors=False)["config"]
    config = transformers.Gemma3TextConfig(
        **{k: v for k, v in meta.items() if k not in ("model_type", "_model_name_or_path", "architectures")}
    )
    config._attn_implementation = "eager"
    ref = transformers.Gemma3ForCausalLM(config).eval()
    tensors = load_gguf_checkpoint(str(default_gguf), return_tensors=True, model_to_load=ref)["tensors"]
    missing, unexpected = ref.load_state_dict(tensors, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to the embedding
    ref.tie_weights()
    ours = llamaherd.load(default_gguf)
    net = dequantized(ours.net)
    for text in (PROMPTS[1], PROMPTS[-1]):  # code, and a prompt longer than the 512-token window
        ids = torch.tensor([ours.tokenizer.encode(text, bos=True)])
        with torch.no_grad():
            torch.testing.assert_close(net(ids), ref(ids).logits.float(), atol=5e-4, rtol=1e-4)


def test_packed_runtime_equals_the_decoded_copy(default_gguf, monkeypatch):
    """The GGUF runtime (packed weights decoded per call) computes what the comparison's float copy does."""
    import llamaherd
    from llamaherd.native import ggml_kernels

    # Float math at float32 tolerance: the float-activation kernels, not the default int8 activations
    # (llama.cpp's rounding of x; the runtime with them is compared with llama.cpp above).
    monkeypatch.setattr(ggml_kernels, "INT8_ACTIVATIONS", False)

    packed = llamaherd.load(default_gguf)
    ids = packed.tokenizer.encode("The capital of France is", bos=True)
    got = packed.logits(ids)
    plain = dequantized(llamaherd.load(default_gguf).net)
    with torch.no_grad():
        torch.testing.assert_close(got, plain(torch.tensor([ids]))[0], atol=1e-4, rtol=1e-4)
