"""Images sent to the servers: an image for a text-only model (and, until the engine serves images, for any
model) is a 400 with a message saying so, on both APIs, and the server keeps serving."""

from __future__ import annotations

import base64

import httpx
import pytest

from .server_fixtures import start

PNG = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d763f8cfc0000003010100"
    "c9fe92ef0000000049454e44ae426082")).decode()  # a 1x1 PNG


@pytest.fixture(scope="module")
def live():
    server, served = start()
    yield server
    server.stop()


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"model": "tiny-llama3", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        {"type": "text", "text": "what is this?"}]}]}),
    ("/v1/chat/completions", {"model": "tiny-llama3", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}),
    ("/api/chat", {"model": "tiny-llama3", "stream": False, "options": {"num_predict": 2},
                   "messages": [{"role": "user", "content": "what is this?", "images": [PNG]}]}),
    ("/api/generate", {"model": "tiny-llama3", "stream": False, "prompt": "what is this?", "images": [PNG],
                       "options": {"num_predict": 2}}),
])
def test_image_requests_get_a_400_and_the_server_keeps_serving(live, path, body):
    with httpx.Client(base_url=live.url, timeout=60) as client:
        r = client.post(path, json=body)
        assert r.status_code == 400, r.text[:300]
        assert "image" in r.json()["error"]["message"]
        ok = client.post("/v1/chat/completions", json={"model": "tiny-llama3", "max_tokens": 2,
                                                        "messages": [{"role": "user", "content": "hi"}]})
        assert ok.status_code == 200
