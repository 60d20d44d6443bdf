"""`herd run|chat|serve MODEL --tp N`: this process becomes rank 0 of N (the others spawned beside it, or the
group torchrun formed), every rank loads its slice, and rank 0 leads the others step by step (`lockstep.py`).

Rank 0 stays the process the user started (its terminal, stdin and signals), so the spawned ranks are its
children: gloo on CPU, NCCL with one GPU per rank, a file rendezvous (no ports) as `train/distributed.py` does.
A rank that dies takes the group down: rank 0's next collective fails (the request in flight gets an error) and
a watchdog ends rank 0 with exit status 1 within seconds, idle or not.
"""

from __future__ import annotations

import atexit
import faulthandler
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from multiprocessing.connection import wait
from pathlib import Path

import torch
import torch.distributed as dist

from ..train.distributed import _backend, init_from_environment
from .lockstep import follow, lead, release
from .tp import ParallelError, check_divisible

GRACE_SECONDS = 2.0  # after a rank dies: time for rank 0's in-flight requests to receive their error


def _threads(tp: int, threads: int | None) -> int:
    return threads or max(1, (os.cpu_count() or 1) // tp)


def _check_source(path: Path, tp: int) -> None:
    """Raise ParallelError unless the model at `path` cuts over `tp` ranks, read as cheaply as the format allows
    (a Meta folder: its first shard only; otherwise the mapped checkpoint, packed GGUF blocks included)."""
    from ..checkpoint import read
    from ..checkpoint.detect import detect_format
    from ..checkpoint.meta_pth import read_rank
    from ..checkpoint.pth import shard_files
    from .load import check_readable

    if detect_format(path) == "meta":
        piece = read_rank(path, 0, len(shard_files(path)))
        if piece is not None:
            check_divisible(piece.config, tp)
            return
    check_readable(read(path), tp)


def _follower(rank: int, tp: int, init_file: str, source: str, dtype, threads: int, quantize: str | None) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group(_backend(), init_method=f"file://{init_file}", rank=rank, world_size=tp)
    if torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())
    try:
        _load_and_follow(source, dtype, quantize)
    except Exception as exc:  # noqa: BLE001 - one line, then the exit status the watchdog reports
        print(f"error: rank {rank}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)


def _load_and_follow(source: str, dtype, quantize: str | None) -> None:
    from .load import load_parallel

    follow(load_parallel(source, dtype=dtype, quantize=quantize).net)


def _watch(procs: list, done: threading.Event) -> None:
    """End rank 0 (status 1) when a spawned rank exits before rank 0 released the group."""
    wait([p.sentinel for p in procs])
    if done.is_set():
        return
    dead = [(i + 1, p.exitcode) for i, p in enumerate(procs) if p.exitcode is not None]
    print(f"error: tensor-parallel rank {dead[0][0]} exited (status {dead[0][1]}); stopping", file=sys.stderr,
          flush=True)
    # faulthandler's timer is a C thread: it ends the process even if a thread blocked in a collective on the
    # broken group holds the interpreter lock (seen once: this thread's sleep then never returned)
    faulthandler.dump_traceback_later(GRACE_SECONDS + 1, exit=True, file=open(os.devnull, "w"))  # noqa: SIM115
    time.sleep(GRACE_SECONDS)
    os._exit(1)


def load_as_leader(source: str | Path, dtype: torch.dtype | None, tp: int, threads: int | None = None,
                   quantize: str | None = None):
    """Form (or join, under torchrun) a group of `tp` ranks and load this rank's slice of `source`.

    Returns rank 0's Model, its forwards led over the group. On any other rank (torchrun) the process follows
    rank 0 until released and then exits here.
    """
    from .load import load_parallel

    if tp < 2:
        raise ParallelError(f"--tp must be at least 2 to split a model over processes, got {tp}")
    path = Path(source)
    if init_from_environment():
        if dist.get_world_size() != tp:
            raise ParallelError(f"--tp {tp} but torchrun started {dist.get_world_size()} processes; make them equal")
        _check_source(path, tp)
        if dist.get_rank() != 0:
            _load_and_follow(str(path), dtype, quantize)
            raise SystemExit(0)
        atexit.register(_release, [], threading.Event())  # torchrun watches the processes itself
    else:
        _check_source(path, tp)  # before any process starts
        n = _threads(tp, threads)
        torch.set_num_threads(n)
        ctx = mp.get_context("spawn")
        rdzv = tempfile.mkdtemp(prefix="llamaherd-tp-")
        init_file = str(Path(rdzv) / "rendezvous")
        procs = [ctx.Process(target=_follower, args=(r, tp, init_file, str(path), dtype, n, quantize),
                              daemon=True)
                 for r in range(1, tp)]
        for p in procs:
            p.start()
        done = threading.Event()  # watched from the start: a rank that fails to start must not leave us waiting
        threading.Thread(target=_watch, args=(procs, done), daemon=True, name="tp-watchdog").start()
        dist.init_process_group(_backend(), init_method=f"file://{init_file}", rank=0, world_size=tp)
        atexit.register(_release, procs, done)
    model = load_parallel(path, dtype=dtype, quantize=quantize)
    lead(model.net)
    return model


def _release(procs: list, done: threading.Event) -> None:
    done.set()
    try:
        release()
    except Exception:  # noqa: BLE001 - a rank already gone: nothing to release
        pass
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()


__all__ = ["load_as_leader"]
