"""Every model chats (built-in format fallback), and Ollama's metadata routes tell the truth about the served files."""

import hashlib
import json
import os
from datetime import datetime

import httpx
import pytest

from llamaherd import load
from llamaherd.server import ServedModel

from .server_fixtures import LiveServer, start
from .store_fixtures import add_to_ollama_store, random_gemma_state, write_tiny_gemma_gguf

TURNS = ("<start_of_turn>", "<end_of_turn>")  # Gemma 3's turn markers, control tokens in its vocabulary


@pytest.fixture
def homes(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMAHERD_HOME", str(tmp_path / "herd"))
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    return tmp_path


@pytest.fixture
def gemma_server(homes):
    path = write_tiny_gemma_gguf(homes / "base.gguf", random_gemma_state(), extra_specials=TURNS)
    os.utime(path, (1_600_000_000, 1_600_000_000))  # a file time far from the server's start
    server = LiveServer(ServedModel(load(path), "base", kv_cache_bytes=8 << 20))
    yield server, path
    server.stop()


def test_tags_and_ps_report_the_files_size_sha256_and_time(gemma_server):
    server, path = gemma_server
    data = path.read_bytes()
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for route in ("/api/tags", "/api/ps"):
            entry = c.get(route).json()["models"][0]
            assert entry["size"] == len(data) == path.stat().st_size
            assert entry["digest"] == hashlib.sha256(data).hexdigest()
        modified = c.get("/api/tags").json()["models"][0]["modified_at"]
        assert datetime.fromisoformat(modified.replace("Z", "+00:00")).timestamp() == 1_600_000_000
        show = c.post("/api/show", json={"model": "base"}).json()
        assert show["modified_at"] == modified
        assert str(path) not in json.dumps(show)  # no server file path in what clients see


def test_digest_is_the_one_herd_list_shows_and_is_cached(homes):
    from llamaherd import store
    from llamaherd.cli import main

    gguf = write_tiny_gemma_gguf(homes / "m.gguf", random_gemma_state())
    add_to_ollama_store(homes / "ollama", "tiny:1b", gguf)
    stored = next(m for m in store.list_models() if m.name == "tiny:1b")
    assert store.model_digest(stored.path) == stored.digest == hashlib.sha256(gguf.read_bytes()).hexdigest()
    # A file outside any store is hashed once; the cache answers next time, and a changed file is hashed again.
    loose = write_tiny_gemma_gguf(homes / "loose.gguf", random_gemma_state(seed=1))
    first = store.model_digest(loose)
    cache = json.loads((homes / "herd" / store.DIGESTS).read_text())
    assert cache[str(loose.resolve())][2] == first == hashlib.sha256(loose.read_bytes()).hexdigest()
    cache[str(loose.resolve())][2] = "cached"
    (homes / "herd" / store.DIGESTS).write_text(json.dumps(cache))
    assert store.model_digest(loose) == "cached"
    write_tiny_gemma_gguf(loose, random_gemma_state(seed=2))
    os.utime(loose, (1_700_000_000, 1_700_000_000))
    assert store.model_digest(loose) == hashlib.sha256(loose.read_bytes()).hexdigest()
    assert main(["list"]) == 0


def test_capabilities_follow_what_the_model_can_do(gemma_server):
    server, _ = gemma_server
    with httpx.Client(base_url=server.url, timeout=60) as c:
        caps = c.post("/api/show", json={"model": "base"}).json()["capabilities"]
    assert caps == ["completion", "chat", "embedding"]  # gemma3's built-in format: no tool calls, no vision
    live, _ = start()
    try:
        with httpx.Client(base_url=live.url, timeout=60) as c:
            caps = c.post("/api/show", json={"model": "tiny-llama3"}).json()["capabilities"]
        assert caps == ["completion", "chat", "tools", "embedding"]
    finally:
        live.stop()


def test_base_gemma_chats_in_its_builtin_format_and_completes_raw(gemma_server):
    """A Gemma 3 checkpoint without a template chats in gemma3's format on the chat routes (as llama.cpp's
    built-in template), while Ollama's /api/generate completes its prompt as text ({{ .Prompt }})."""
    from llamaherd.chat import get_format

    server, path = gemma_server
    model = load(path)
    choice = model.chat_format_choice
    assert choice.name == "gemma3" and choice.builtin and "no chat template" in choice.reason
    msgs = [{"role": "user", "content": "Hi"}]
    expected = get_format("gemma3", model.tokenizer).encode_dialog(msgs, add_generation_prompt=True)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(expected)
        r = c.post("/api/chat", json={"model": "base", "messages": msgs, "stream": False,
                                      "options": {"num_predict": 2}})
        assert r.status_code == 200 and r.json()["prompt_eval_count"] == len(expected)
        r = c.post("/api/generate", json={"prompt": "ab", "stream": False, "options": {"num_predict": 3}})
        assert r.json()["prompt_eval_count"] == len(model.tokenizer.encode("ab", bos=True))


def test_chat_errors_over_http_name_no_server_path(homes):
    """A model with no format at all answers 400 saying what to do, without the server's file path."""
    from llamaherd.api import Model
    from llamaherd.checkpoint.base import Checkpoint

    from .server_fixtures import CONFIG, tiny_llama3

    base = tiny_llama3()
    secret = homes / "private" / "weights"
    model = Model(base.net, Checkpoint(CONFIG, {}, secret, tokenizer=None))
    server = LiveServer(ServedModel(model, "nofmt", kv_cache_bytes=8 << 20))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
            assert r.status_code == 400
            message = r.json()["error"]["message"]
            assert "chat format" in message and str(homes) not in message and "--chat-format" in message
    finally:
        server.stop()


def test_error_messages_lose_the_servers_paths(homes):
    from llamaherd.errors import CheckpointError, ChatFormatError
    from llamaherd.server.app import _without_paths

    from .server_fixtures import tiny_llama3

    model = tiny_llama3()
    model.checkpoint.source = homes / "private" / "model.gguf"
    served = ServedModel(model, "tiny", kv_cache_bytes=8 << 20)
    message = _without_paths(ChatFormatError(f"{model.checkpoint.source}: this checkpoint has no tokenizer"), served)
    assert message == "tiny: this checkpoint has no tokenizer"
    assert _without_paths(CheckpointError(model.checkpoint.source, "truncated tensor data"), served) == \
        "truncated tensor data"
    assert str(homes) not in _without_paths(ChatFormatError(f"see {homes / 'private'}/other"), served)


def test_serve_start_line_says_which_builtin_format(homes):
    from llamaherd.cli.serve import chat_note

    with_turns = load(write_tiny_gemma_gguf(homes / "t.gguf", random_gemma_state(), extra_specials=TURNS))
    assert chat_note(with_turns) == "; no chat template in the checkpoint: using the built-in gemma3 format"
    bare = load(write_tiny_gemma_gguf(homes / "b.gguf", random_gemma_state()))
    assert "no chat format" in chat_note(bare) and "--chat-format" in chat_note(bare)


@pytest.mark.slow
def test_official_clients_chat_with_the_default_model(tmp_path_factory):
    """The openai and ollama clients' chat calls on the default model (a base Gemma 3 GGUF without a template),
    and /api/tags reporting the file's own size and sha256."""
    openai = pytest.importorskip("openai")
    ollama = pytest.importorskip("ollama")
    from llamaherd import store

    pytest.importorskip(store.PACKAGED[store.DEFAULT_MODEL].module, reason="install llamaherd[models]")
    mp = pytest.MonkeyPatch()
    mp.setenv("LLAMAHERD_HOME", str(tmp_path_factory.mktemp("herd")))
    try:
        path = store.default_model(progress=lambda *_: None)
        server = LiveServer(ServedModel(load(path), store.DEFAULT_MODEL, kv_cache_bytes=64 << 20))
        try:
            oa = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
            r = oa.chat.completions.create(model=store.DEFAULT_MODEL, max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "Name a planet."}])
            assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens >= 1
            ol = ollama.Client(host=server.url, timeout=120)
            reply = ol.chat(model=store.DEFAULT_MODEL, messages=[{"role": "user", "content": "Name a planet."}],
                            options={"num_predict": 8, "temperature": 0})
            assert reply.done and reply.message.role == "assistant"
            entry = ol.list().models[0]
            assert entry.size == path.stat().st_size
            assert entry.digest == hashlib.sha256(path.read_bytes()).hexdigest()
            assert "chat" in ol.show(store.DEFAULT_MODEL).capabilities
        finally:
            server.stop()
    finally:
        mp.undo()
