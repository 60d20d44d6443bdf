"""A real uvicorn server on loopback around a tiny random-weight Llama 3 model with the official tokenizer."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
import torch
import uvicorn

from llamaherd.api import Model
from llamaherd.checkpoint.base import Checkpoint
from llamaherd.config import GenerationDefaults, ModelConfig
from llamaherd.server import ServedModel, create_app
from llamaherd.server.http import KEEP_ALIVE_S
from llamaherd.tokenizer import Tokenizer

from .conftest import random_model

# Llama 3 vocabulary, tiny everything else: the official tokenizer and chat format run for real.
CONFIG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32,
                     rope_theta=500000.0, max_seq_len=2048)


def tiny_llama3() -> Model:
    net = random_model(CONFIG, seed=0, std=0.5)
    tok = Tokenizer.llama3()
    ckpt = Checkpoint(CONFIG, {}, Path("tiny-llama3"), tokenizer=tok,
                      generation=GenerationDefaults(eos_token_ids=(tok.special_id("<|eot_id|>"),)))
    return Model(net, ckpt)


class LiveServer:
    """uvicorn in a background thread; `stop()` shuts it down gracefully."""

    def __init__(self, served: ServedModel, api_key: str | None = None) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(served, api_key=api_key), host="127.0.0.1", port=self.port,
                                log_level="warning", timeout_graceful_shutdown=10,
                                timeout_keep_alive=KEEP_ALIVE_S)  # as herd serve (no keep-alive race)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def start(api_key: str | None = None, kv_cache_bytes: int = 64 << 20, **engine) -> tuple[LiveServer, ServedModel]:
    torch.manual_seed(0)
    served = ServedModel(tiny_llama3(), "tiny-llama3", kv_cache_bytes=kv_cache_bytes, **engine)
    return LiveServer(served, api_key), served


@pytest.fixture(scope="module")
def live():
    """One default server per test module: (server, served). Import it next to `start` to use it."""
    server, served = start()
    yield server, served
    server.stop()
