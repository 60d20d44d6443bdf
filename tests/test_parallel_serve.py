"""`herd serve --tp 2` as a real process: the official openai client gets the one-process answers, two streams
at once (continuous batching over the lockstep ranks); a rank killed mid-stream gives the client an error and the
server exits non-zero within seconds."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

import llamaherd
from bench.serve_common import HerdServe, write_llama3_folder
from llamaherd.config import ModelConfig

openai = pytest.importorskip("openai")

# Llama 3's vocabulary (the official tokenizer.model travels in the folder), tiny everything else; 2 KV heads.
TINY_LLAMA3 = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32,
                          rope_theta=500000.0, max_seq_len=2048, tie_embeddings=True)
PROMPTS = ["Name three colours.", "Count to five, please."]


def _followers(pid: int) -> list[int]:
    """The spawned ranks among the server's child processes (not multiprocessing's resource tracker)."""
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(k) for k in kids if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]


@pytest.mark.slow  # ~90 s on two busy cores: three processes start, then the server is killed
def test_serve_tp2_answers_the_openai_client_and_fails_loudly_when_a_rank_dies(tmp_path):
    folder = write_llama3_folder(tmp_path / "tiny-llama3", TINY_LLAMA3)
    model = llamaherd.load(folder, dtype=torch.float32)
    want = [model.chat([{"role": "user", "content": p}], temperature=0, max_tokens=12) for p in PROMPTS]
    want = [w["content"] for w in want]
    server = HerdServe(folder, "--tp", "2", "--dtype", "float32", "--threads", "1", name="tiny",
                       log=tmp_path / "serve.log")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        got: dict[int, str] = {}

        def ask(i: int) -> None:
            stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPTS[i]}],
                                                    temperature=0, max_tokens=12, stream=True)
            got[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert [got.get(0), got.get(1)] == want, (tmp_path / "serve.log").read_text()[-3000:]

        # embeddings read hidden states through a view of the model, which a split model does not serve: a 4xx
        with pytest.raises(openai.BadRequestError, match="embeddings need a server without --tp"):
            client.embeddings.create(model="tiny", input="hello")

        # a rank dies mid-stream: the client gets an error, the server exits non-zero within seconds
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Go on."}],
                                                temperature=0, max_tokens=1500, stream=True,
                                                extra_body={"ignore_eos": True})
        pieces, killed_at = 0, None
        with pytest.raises(openai.APIError):
            for chunk in stream:
                pieces += 1
                if pieces == 5:
                    (follower,) = _followers(server.proc.pid)
                    os.kill(follower, signal.SIGKILL)
                    killed_at = time.time()
        assert killed_at is not None
        server.proc.wait(timeout=30)
        assert server.proc.returncode != 0
        assert time.time() - killed_at < 15
        assert "rank 1 exited" in (tmp_path / "serve.log").read_text()
    finally:
        server.stop()
