"""Shared by the serving benchmarks and tests: a random-weight Llama 3 folder on disk and a `herd serve` process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import torch

from llamaherd.checkpoint.base import Checkpoint
from llamaherd.checkpoint.save import save
from llamaherd.config import ModelConfig
from llamaherd.model import build

# Llama 3 vocabulary and tokenizer; dim 256, 4 layers, tied embeddings: 35.4M parameters, most of them the
# 128,256 x 256 embedding that is also the output projection (as Llama 3.2 1B/3B tie theirs).
BENCH_CONFIG = ModelConfig(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=256,
                           rope_theta=500000.0, max_seq_len=4096, tie_embeddings=True)


def write_llama3_folder(dst: Path, config: ModelConfig = BENCH_CONFIG, seed: int = 0) -> Path:
    """A Meta-format folder (params.json, consolidated.00.pth, the official tokenizer.model) with random weights."""
    dst = Path(dst)
    if (dst / "params.json").exists():
        return dst
    torch.manual_seed(seed)
    net = build(config)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.5 if "tok_embeddings" in name else 0.05)
    tokenizer_dir = resources.files("llama_models.llama3")  # holds the official tokenizer.model
    with resources.as_file(tokenizer_dir) as src:
        save(Checkpoint(config, net.state_dict(), Path(src)), dst, "meta")
    if not (dst / "tokenizer.model").exists():
        raise RuntimeError(f"{dst}: the Llama 3 tokenizer.model was not copied from llama_models")
    return dst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HerdServe:
    """`herd serve FOLDER` as a child process on a loopback port; `stop()` sends SIGTERM and waits."""

    def __init__(self, folder: Path, *args: str, name: str = "bench", log: Path | None = None,
                 ready_timeout: float = 180.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        herd = Path(sys.executable).with_name("herd")  # the console script installed beside this Python
        cmd = [str(herd), "serve", str(folder), "--host", "127.0.0.1",
               "--port", str(self.port), "--name", name, *args]
        self.log = open(log, "wb") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ})
        self._wait_ready(ready_timeout)

    def _wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"herd serve exited with {self.proc.returncode} before answering")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.proc.kill()
        raise RuntimeError(f"herd serve did not answer /health within {timeout:.0f}s")

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log is not subprocess.DEVNULL:
            self.log.close()
        return self.proc.returncode

    def __enter__(self) -> HerdServe:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
