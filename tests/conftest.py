"""Shared fixtures: tiny random-weight configurations and models, and Meta's reference runtime."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from bench.llamacpp import without_weight_repacking
from llamaherd.config import ModelConfig, RopeScaling
from llamaherd.model import build

# Every test runs the llama.cpp reference without weight repacking (bench/llamacpp.py says why: its AMX
# kernel segfaults on these models on CPUs with AMX, killing the whole pytest process). Repacking changes the
# weights' layout, not the arithmetic the tests compare against.
without_weight_repacking()


# Tiny configurations shaped like each Llama generation (numbers small, structure faithful).
TINY = {
    # Llama 2: multi-head attention, theta 1e4, separate output.
    "llama2": ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=256, multiple_of=32, norm_eps=1e-5,
                          rope_theta=10000.0, max_seq_len=512),
    # Llama 3: grouped-query attention, theta 5e5.
    "llama3": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32,
                          ffn_dim_multiplier=1.3, rope_theta=500000.0, max_seq_len=512),
    # Llama 3.1: Llama 3 plus frequency scaling (factor 8, as Meta's reference hard-codes).
    "llama3.1": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32,
                            ffn_dim_multiplier=1.3, rope_theta=500000.0, max_seq_len=16384,
                            rope_scaling=RopeScaling(factor=8.0)),
    # Llama 3.2: tied embeddings, ffn_dim_multiplier, scaling.
    "llama3.2": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=256, multiple_of=32,
                            ffn_dim_multiplier=1.5, rope_theta=500000.0, max_seq_len=16384,
                            rope_scaling=RopeScaling(factor=8.0), tie_embeddings=True),
}


def random_model(config: ModelConfig, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """A model with random weights large enough that every component moves the logits."""
    torch.manual_seed(seed)
    net = build(config)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    return net


@pytest.fixture(params=sorted(TINY))
def tiny_family(request):
    return request.param, TINY[request.param]


@pytest.fixture(scope="session")
def meta_parallel():
    """Initialise torch.distributed + fairscale model parallelism (world size 1) for Meta's reference."""
    pytest.importorskip("fairscale")
    import torch.distributed as dist
    import fairscale.nn.model_parallel.initialize as fs_init

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=0, world_size=1)
    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(1)
    yield


def cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
