"""Data-parallel training with FSDP2 (`torch.distributed.fsdp.fully_shard`): gloo on CPU, NCCL on GPUs.

Each decoder layer and then the whole model are sharded (the recipe of torchtitan and PyTorch's FSDP2 tutorial):
parameters, gradients and optimizer state live in shards; a layer's weights are gathered for its forward and
backward. Each optimizer step's micro-batches are split by rows over the ranks, so N processes compute the
step a single process computes (tests/test_train_distributed.py holds the two loss curves together).

Started by `herd finetune --nproc N` (processes spawned here, a file rendezvous, no ports) or by `torchrun`
(`RANK`, `WORLD_SIZE`, `MASTER_ADDR`/`MASTER_PORT` in the environment).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from ..errors import LlamaherdError, TrainingError


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def device() -> str | None:
    """Where this process trains: its GPU under NCCL, else None (the default, CPU)."""
    return f"cuda:{torch.cuda.current_device()}" if active() and dist.get_backend() == "nccl" else None


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def shard(net: nn.Module) -> None:
    """fully_shard every decoder layer, then the root (embeddings, final norm, output) in place.

    Frozen weights (a LoRA base) are sharded as well: they take 1/N of the memory and are gathered per layer.
    Packed GGUF weights (QLoRA) are not tensors FSDP can split; they are refused by name.
    """
    from torch.distributed.fsdp import fully_shard

    from ..quant.ggml import GGMLWeight

    packed = [n for n, p in net.named_parameters() if isinstance(p, GGMLWeight)]
    packed += [n for n, b in net.named_buffers() if isinstance(b, GGMLWeight)]
    if packed:
        raise TrainingError(f"packed GGUF weights ({packed[0]}, ...) cannot be sharded: run QLoRA in one process "
                            "(without --nproc), or --method lora, which decodes them to float first")
    for layer in net.layers:
        fully_shard(layer)
    fully_shard(net)


def full_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with every sharded DTensor gathered whole (a collective: every rank calls it, same keys in order)."""
    from torch.distributed.tensor import DTensor

    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}


def load_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a whole tensor into `param`, which may be this rank's shard of a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(param, DTensor):
            param.copy_(distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements))
        else:
            param.copy_(full)


def optimizer_state(optimizer) -> dict:
    """`optimizer.state_dict()` with sharded moments gathered whole (a collective under FSDP): the same file in
    one process or N, so a run can resume on another number of processes."""
    sd = optimizer.state_dict()
    sd["state"] = {i: full_state(s) for i, s in sd["state"].items()}
    return sd


def load_optimizer_state(optimizer, state: dict) -> None:
    """Load a whole-tensor optimizer state, each moment cut to its parameter's shard under FSDP."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    cut = {}
    for i, s in state["state"].items():
        p = params[int(i)]
        cut[i] = {k: distribute_tensor(v.to(p.dtype), p.device_mesh, p.placements)
                  if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape else v
                  for k, v in s.items()}
    optimizer.load_state_dict({**state, "state": cut})


def sum_across(value: float) -> float:
    """The sum of a float over the ranks (the value itself in one process)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return float(t[0])


def barrier() -> None:
    if active():
        dist.barrier()


def rows_of(indices: list[int]) -> tuple[list[int], float]:
    """This rank's share of one micro-batch (round-robin over the rows) and the weight of its loss.

    A rank left without rows (a micro-batch smaller than the world) runs the batch's first row at weight 0, so
    every rank makes the same forward/backward calls and FSDP's collectives stay in step.
    """
    mine = indices[rank()::world()]
    return (mine, 1.0) if mine else (indices[:1], 0.0)


# -- launching --------------------------------------------------------------------------------------------------

def _worker(local_rank: int, nproc: int, init_file: str, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
    dist.init_process_group(_backend(), init_method=f"file://{init_file}", rank=local_rank, world_size=nproc)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    try:
        fn(*args)
    except LlamaherdError as exc:  # one line, as the single-process CLI prints it, then a non-zero exit
        if local_rank == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        dist.destroy_process_group()


def launch(fn: Callable, args: tuple, nproc: int) -> int:
    """Run `fn(*args)` in `nproc` spawned processes joined in one process group; 0 when all succeed.

    `fn` must be picklable (a module-level function). Each process gets cores / nproc torch threads.
    """
    import torch.multiprocessing as mp

    if nproc < 2:
        raise TrainingError(f"--nproc must be at least 2 to shard, got {nproc}")
    with tempfile.TemporaryDirectory(prefix="llamaherd-rdzv-") as tmp:
        try:
            mp.spawn(_worker, args=(nproc, str(Path(tmp) / "rendezvous"), fn, args), nprocs=nproc, join=True)
        except mp.ProcessExitedException:
            return 1
    return 0


def init_from_environment() -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE set); False when not started by torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or "RANK" not in os.environ:
        return False
    if not dist.is_initialized():
        dist.init_process_group(_backend())
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return True
