"""Embeddings (mean-pooled final hidden states, L2-normalised) against llama.cpp and transformers, and over HTTP
through the official openai and ollama clients."""

import numpy as np
import pytest
import torch

import llamaherd
from llamaherd.errors import ContextLengthError

from .server_fixtures import live  # noqa: F401  (the module's server fixture)
from .store_fixtures import random_gemma_state, write_tiny_gemma_gguf

TEXTS = ["The cat sat on the mat.", "def add(a, b):\n    return a + b", "Les élèves étudient la photosynthèse."]


def _cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def llamacpp_mean_embedding(path, ids: list[int], n_ctx: int) -> np.ndarray:
    """llama.cpp's sequence embedding with LLAMA_POOLING_TYPE_MEAN, through llama-cpp-python's C API (its
    high-level `embed` clears the KV cache through a call this llama.cpp no longer has)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    # One batch holds the whole text: pooled embeddings need every token in one ubatch.
    llm = llama_cpp.Llama(str(path), embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, n_ctx=n_ctx,
                          n_batch=n_ctx, n_ubatch=n_ctx, n_threads=2, verbose=False)
    ctx = llm._ctx.ctx
    batch = llama_cpp.llama_batch_init(len(ids), 0, 1)
    try:
        for i, t in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, True
            batch.seq_id[i][0] = 0
        batch.n_tokens = len(ids)
        assert llama_cpp.llama_decode(ctx, batch) == 0
        dim = llama_cpp.llama_model_n_embd(llm._model.model)
        return np.ctypeslib.as_array(llama_cpp.llama_get_embeddings_seq(ctx, 0), shape=(dim,)).copy()
    finally:
        llama_cpp.llama_batch_free(batch)
        llm.close()


def test_tiny_gemma_embeddings_equal_llamacpp_mean_pooling(tmp_path):
    path = write_tiny_gemma_gguf(tmp_path / "g.gguf", random_gemma_state())
    model = llamaherd.load(path)
    for ids in ([2, 10, 20, 30, 40], [2, *range(50, 110)]):  # the second is longer than the 4-token window
        ref = llamacpp_mean_embedding(path, ids, 128)
        from llamaherd.engine.embedding import embed

        ours = embed(model.net, [ids], 128)[0]
        assert abs(float(ours.norm()) - 1) < 1e-5
        assert _cosine(ours, ref) > 0.9999


def test_embed_api_shapes_normalisation_and_limits():
    from .server_fixtures import tiny_llama3

    model = tiny_llama3()
    one = model.embed("hello")
    many = model.embed(["hello", "a longer text to embed"])
    assert one.shape == (model.config.dim,) and many.shape == (2, model.config.dim)
    torch.testing.assert_close(many.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(many[0], one)
    raw = model.embed("hello", normalize=False)
    torch.testing.assert_close(raw / raw.norm(), one)
    with pytest.raises(ContextLengthError, match="context window"):
        model.embed("word " * 3000)
    # The served network is not changed by embedding: generation gives the same logits after as before.
    ids = model.tokenizer.encode("hello", bos=True)
    before = model.logits(ids)
    model.embed("hello")
    torch.testing.assert_close(model.logits(ids), before)


def test_openai_client_embeddings(live):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=live[0].url + "/v1", api_key="unused", max_retries=0, timeout=60)
    expected = live[1].model.embed(TEXTS).numpy()
    r = client.embeddings.create(model="tiny-llama3", input=TEXTS)  # the client asks for base64 by default
    got = np.array([d.embedding for d in r.data])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert r.usage.prompt_tokens == sum(len(live[1].tokenizer.encode(t, bos=True)) for t in TEXTS)
    r = client.embeddings.create(model="tiny-llama3", input="x", encoding_format="float", dimensions=8)
    v = np.array(r.data[0].embedding)
    assert v.shape == (8,) and abs(np.linalg.norm(v) - 1) < 1e-5


def test_ollama_client_embed_and_raw_routes(live):
    ollama = pytest.importorskip("ollama")
    import httpx

    client = ollama.Client(host=live[0].url, timeout=60)
    expected = live[1].model.embed(TEXTS).numpy()
    r = client.embed(model="tiny-llama3", input=TEXTS)
    np.testing.assert_allclose(np.array(r.embeddings), expected, atol=1e-5)
    old = client.embeddings(model="tiny-llama3", prompt=TEXTS[0])
    np.testing.assert_allclose(np.array(old.embedding), expected[0], atol=1e-5)
    with httpx.Client(base_url=live[0].url, timeout=60) as c:
        body = c.post("/api/embed", json={"input": "x"}).json()
        assert body["pooling"] == "mean" and c.post("/v1/embeddings", json={"input": "x"}).json()["pooling"] == "mean"
        long = "word " * 3000
        r = c.post("/api/embed", json={"input": long})
        assert r.status_code == 400 and "context window" in r.json()["error"]["message"]
        r = c.post("/api/embed", json={"input": long, "truncate": True})  # asked for explicitly: truncated
        assert r.status_code == 200 and r.json()["prompt_eval_count"] == live[1].context_length
        assert c.post("/v1/embeddings", json={"input": ""}).status_code == 400
        assert c.post("/v1/embeddings", json={"input": [[]]}).status_code == 400
        assert c.post("/v1/embeddings", json={"input": "x", "model": "other"}).status_code == 404


@pytest.fixture(scope="module")
def default_gguf(tmp_path_factory):
    from llamaherd import store

    pytest.importorskip(store.PACKAGED[store.DEFAULT_MODEL].module, reason="install llamaherd[models]")
    mp = pytest.MonkeyPatch()
    mp.setenv("LLAMAHERD_HOME", str(tmp_path_factory.mktemp("herd")))
    try:
        yield store.default_model(progress=lambda *_: None)
    finally:
        mp.undo()


@pytest.mark.slow
def test_default_model_embeddings_match_llamacpp(default_gguf):
    """The default model (Gemma 3 270M, Q4_K_M) against llama.cpp's mean-pooled embeddings of the same file,
    cosine >= 0.99 per text (ours as served: packed weights, int8 activations). llama.cpp runs without weight
    repacking (tests/conftest.py, bench/llamacpp.py: its AMX kernel crashes on this CPU)."""
    served = llamaherd.load(default_gguf)
    texts = [*TEXTS, "東京は日本の首都であり、", "The quick brown fox jumps over the lazy dog. " * 60]  # 602 tokens
    for text in texts:
        ids = served.tokenizer.encode(text, bos=True)
        assert _cosine(served.embed(text), llamacpp_mean_embedding(default_gguf, ids, 1024)) >= 0.99


@pytest.mark.slow
def test_default_model_embeddings_match_transformers(default_gguf):
    """The default model against transformers reading the same GGUF: its last hidden state (after the final
    norm), mean-pooled."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = default_gguf
    meta = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    config = transformers.Gemma3TextConfig(
        **{k: v for k, v in meta.items() if k not in ("model_type", "_model_name_or_path", "architectures")})
    config._attn_implementation = "eager"
    ref = transformers.Gemma3ForCausalLM(config).eval()
    ref.load_state_dict(load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=ref)["tensors"], strict=False)
    ref.tie_weights()
    ours = llamaherd.load(path)
    got = ours.embed(TEXTS)
    for text, vec in zip(TEXTS, got):
        ids = torch.tensor([ours.tokenizer.encode(text, bos=True)])
        with torch.no_grad():
            hidden = ref.model(ids).last_hidden_state[0].float()  # after the final norm
        assert _cosine(vec, hidden.mean(0)) >= 0.99
