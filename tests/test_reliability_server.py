"""Server hardening: bodies over the limit without a Content-Length, CORS off unless asked, the API key on every
route that reads or runs anything, and a request's model name never read as a path."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from llamaherd.server import ServedModel, create_app

from .server_fixtures import tiny_llama3

KEY = "s3cret"


@pytest.fixture(scope="module")
def served():
    return ServedModel(tiny_llama3(), "tiny-llama3", kv_cache_bytes=8 << 20)


def client(served, **options) -> TestClient:
    return TestClient(create_app(served, **options), raise_server_exceptions=False)


def test_chunked_body_over_the_limit_is_413(served):
    def chunks():  # no Content-Length: the body arrives in pieces
        yield b'{"model": "tiny-llama3", "prompt": "'
        for _ in range(64):
            yield b"x" * 1024
        yield b'"}'

    with client(served, max_body_bytes=16 << 10) as c:
        r = c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "over 16384 bytes" in r.json()["error"]["message"]
        ok = c.post("/v1/completions", json={"model": "tiny-llama3", "prompt": "hi", "max_tokens": 1})
        assert ok.status_code == 200


def test_cors_is_off_unless_an_origin_is_given(served):
    preflight = {"origin": "https://evil.example", "access-control-request-method": "POST"}
    with client(served) as c:
        r = c.options("/v1/chat/completions", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
        r = c.get("/v1/models", headers={"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
    with client(served, cors_origins=("https://ok.example",)) as c:
        r = c.get("/v1/models", headers={"origin": "https://ok.example"})
        assert r.headers["access-control-allow-origin"] == "https://ok.example"
        r = c.get("/v1/models", headers={"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers


@pytest.mark.parametrize("method, path", [("GET", "/metrics"), ("GET", "/v1/models"), ("GET", "/api/tags"),
                                          ("POST", "/v1/chat/completions"), ("POST", "/api/generate"),
                                          ("POST", "/api/show"), ("GET", "/api/ps")])
def test_api_key_guards_every_route_that_reads_or_runs(served, method, path):
    with client(served, api_key=KEY) as c:
        r = c.request(method, path, json={"model": "tiny-llama3", "prompt": "hi"})
        assert r.status_code == 401, (path, r.status_code)
        r = c.request(method, path, json={"model": "tiny-llama3", "prompt": "hi"},
                      headers={"authorization": "Bearer " + KEY + "x"})
        assert r.status_code == 401
        assert c.get("/health").status_code == 200


@pytest.mark.parametrize("name", ["/etc/passwd", "../../etc/passwd", "~/.ssh/id_rsa", "/tmp"])
def test_model_field_never_names_a_path(served, name):
    with client(served) as c:
        r = c.post("/v1/chat/completions", json={"model": name, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert "root:" not in r.text
        r = c.post("/api/show", json={"model": name})
        assert r.status_code == 404
