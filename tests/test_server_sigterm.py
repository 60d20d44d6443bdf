"""`herd serve` as a real process: SIGTERM lets an in-flight stream finish, then the process exits 0."""

import json
import signal
import threading
import time

import httpx
import pytest

from bench.serve_common import HerdServe, write_llama3_folder
from llamaherd.config import ModelConfig

# Llama 3 vocabulary (the official tokenizer.model travels in the folder), tiny everything else.
TINY_LLAMA3 = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32,
                          rope_theta=500000.0, max_seq_len=2048, tie_embeddings=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_llama3_folder(tmp_path_factory.mktemp("serve") / "tiny-llama3", TINY_LLAMA3)


def test_sigterm_finishes_the_inflight_stream_and_exits_zero(folder, tmp_path):
    server = HerdServe(folder, "--threads", "1", name="tiny", log=tmp_path / "serve.log")
    try:
        n = 300
        body = {"messages": [{"role": "user", "content": "Tell me everything."}], "stream": True, "max_tokens": n,
                "ignore_eos": True, "temperature": 0, "stream_options": {"include_usage": True}}
        pieces, events, sent = [], [], threading.Event()
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if line[6:] != "[DONE]":
                    event = json.loads(line[6:])
                    if event["choices"] and event["choices"][0]["delta"].get("content"):
                        pieces.append(event["choices"][0]["delta"]["content"])
                if len(pieces) == 5 and not sent.is_set():  # mid-stream: ask the server to stop
                    server.proc.send_signal(signal.SIGTERM)
                    sent.set()
        assert sent.is_set()
        assert events[-1] == "[DONE]"
        final = json.loads(events[-2])
        assert final["usage"]["completion_tokens"] == n  # every token arrived, none cut by the shutdown
        finishes = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-2] if json.loads(e)["choices"]]
        assert finishes[-1] == "length"
        deadline = time.time() + 60
        while server.proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert server.proc.returncode == 0, (tmp_path / "serve.log").read_text()[-2000:]
    finally:
        server.stop()


def test_sigterm_when_idle_exits_zero(folder):
    server = HerdServe(folder, "--threads", "1", name="tiny")
    assert httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"] == "tiny"
    assert server.stop(timeout=60) == 0
