"""Fuzz every loader and parser: checkpoint headers here, the other inputs in bench/fuzz_inputs.py.

Each input is a tiny valid file with one mutation; what a user's call does with it (read a checkpoint and build
the model, load a tokenizer and encode, render a chat template, parse a tool call, read an image, POST a request
body) must either succeed or raise a typed LlamaherdError (an HTTP 4xx). Anything else, a hang past the time
limit or a MemoryError past the memory bound included, is a crash and is printed with its input. Each target runs
in its own process; per target: inputs, rejected, accepted, crashes, worst time, peak RSS.

    python bench/fuzz_loaders.py --n 100000 [--targets safetensors,config_json,...] [--seed 0] [--budget-s S]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.fuzz_folders import hf_folder, load_folder, meta_folder  # noqa: E402
from bench.fuzz_inputs import TARGETS as MORE_TARGETS  # noqa: E402
from llamaherd.errors import LlamaherdError  # noqa: E402

# Values of the wrong kind (and edge values of the right one) for JSON fields.
ODD_VALUES = [None, True, False, 0, -1, 1, 2**31, 2**63, -(2**63), 1e308, float("nan"), -0.5, 0.5, "", "7", "x" * 300,
              [], [1, 2], {}, {"a": 1}, "float16", "llama", "bfloat16"]
TIME_LIMIT_S = 10  # per input; the loaders answer a tiny folder in milliseconds
DTYPES = ["F32", "F16", "BF16", "F64", "I8", "U8", "I64", "BOOL", "F8_E4M3", "Q4", "", "f32"]


# ---- mutations ---------------------------------------------------------------------------------------------------


def mutate_safetensors(data: bytes, rng: random.Random) -> bytes:
    """One mutation of a safetensors file: its length prefix, raw header bytes, or one structured header field."""
    (n,) = struct.unpack("<Q", data[:8])
    header, body = data[8:8 + n], data[8 + n:]
    kind = rng.randrange(6)
    if kind == 0:  # the length prefix: huge, zero, off by a little, past the end
        n2 = rng.choice([0, 1, n - 1, n + 1, len(data), 2**63, 2**64 - 1, rng.randrange(2**32), 100_000_001])
        return struct.pack("<Q", n2 % 2**64) + data[8:]
    if kind == 1:  # flip bytes inside the JSON
        h = bytearray(header)
        for _ in range(rng.randint(1, 8)):
            h[rng.randrange(len(h))] = rng.randrange(256)
        return struct.pack("<Q", n) + bytes(h) + body
    if kind == 2:  # truncate anywhere
        return data[:rng.randrange(len(data))]
    meta = json.loads(header)
    name = rng.choice([k for k in meta if k != "__metadata__"])
    entry = meta[name]
    if kind == 3:  # offsets: out of range, reversed, overlapping another tensor, wrong type
        other = meta[rng.choice([k for k in meta if k != "__metadata__"])]["data_offsets"]
        entry["data_offsets"] = rng.choice([
            [0, len(body) + rng.randint(1, 10**6)], list(reversed(entry["data_offsets"])), list(other),
            [entry["data_offsets"][0], entry["data_offsets"][1] - 4], [-1, 4], [0], "0,4", None,
            [2**64 - 8, 2**64 - 1], [0, 2**62]])
    elif kind == 4:  # dtype, or a shape that disagrees with the byte count
        if rng.random() < 0.5:
            entry["dtype"] = rng.choice(DTYPES + ODD_VALUES[:5])
        else:
            entry["shape"] = rng.choice([[], [0], [-1], [2**62, 2**62], [1] * 40, list(reversed(entry["shape"])),
                                         [entry["shape"][0] * 2], "3", None, [1.5]])
    else:  # the whole entry or the metadata of the wrong kind
        meta[rng.choice([name, "__metadata__"])] = rng.choice(ODD_VALUES)
    h = json.dumps(meta).encode()
    return struct.pack("<Q", len(h)) + h + body


def mutate_json(data: bytes, rng: random.Random) -> bytes:
    """config.json / params.json with one or more fields set to values of the wrong kind, removed, or added."""
    if rng.random() < 0.1:  # not JSON at all, or JSON of another shape
        return rng.choice([data[:rng.randrange(len(data))], b"[]", b"null", b"\xff\xfe", b'"x"', b"{" * 10000])
    obj = json.loads(data)
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(list(obj))
        r = rng.random()
        if r < 0.15:
            del obj[key]
            if not obj:
                break
        elif r < 0.25:
            obj["rope_scaling"] = rng.choice(ODD_VALUES + [{"rope_type": "llama3", "factor": rng.choice(ODD_VALUES)},
                                                           {"type": "yarn"}, {"rope_type": rng.choice(ODD_VALUES)}])
        else:
            obj[key] = rng.choice(ODD_VALUES)
    return json.dumps(obj).encode()


TARGETS = {  # name -> (make the valid folder, file to mutate, mutation, what a user's call does with the folder)
    "safetensors": (hf_folder, "model.safetensors", mutate_safetensors, load_folder),
    "config_json": (hf_folder, "config.json", mutate_json, load_folder),
    "params_json": (meta_folder, "params.json", mutate_json, load_folder),
}


# bench/fuzz_inputs.py: Meta .pth zips, tokenizer files, chat templates, tool-call outputs, images, HTTP bodies.
TARGETS.update(MORE_TARGETS)


# ---- running -----------------------------------------------------------------------------------------------------


def fuzz_one(folder: Path, fname: str, valid: bytes, mutate, rng: random.Random,
             consume=load_folder) -> tuple[str, float, str]:
    """(outcome, seconds, detail): outcome is "accepted", "rejected" (a LlamaherdError) or "crash"."""
    data = mutate(valid, rng)
    (folder / fname).write_bytes(data)
    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _hang)
    signal.alarm(TIME_LIMIT_S)
    try:
        consume(folder)
        outcome, detail = "accepted", ""
    except LlamaherdError as exc:
        outcome, detail = "rejected", str(exc)[:100]
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # noqa: BLE001 - anything untyped (a hang, a Rust panic from a native reader) is a crash
        outcome, detail = "crash", traceback.format_exc()[-1500:] + f"\ninput ({len(data)} bytes): {data[:400]!r}"
    finally:
        signal.alarm(0)
    return outcome, time.perf_counter() - start, detail


class Hang(Exception):
    """An input that kept the loader busy past the time limit."""


def _hang(signum, frame):
    raise Hang(f"no answer within {TIME_LIMIT_S} s")


def run_target(name: str, n: int, seed: int, budget_s: float | None = None) -> dict:
    make, fname, mutate, consume = TARGETS[name]
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = make(Path(tmp) / "ckpt")
        valid = (folder / fname).read_bytes()
        consume(folder)  # once, untimed: lazy imports (torch._dynamo on the first meta build) outside the alarm
        counts = {"accepted": 0, "rejected": 0, "crash": 0}
        worst, crashes, start = 0.0, [], time.perf_counter()
        for i in range(n):
            outcome, took, detail = fuzz_one(folder, fname, valid, mutate, rng, consume)
            counts[outcome] += 1
            worst = max(worst, took)
            if outcome == "crash" and len(crashes) < 5:
                crashes.append(detail)
            if budget_s is not None and time.perf_counter() - start > budget_s:
                break
        shutil.rmtree(folder, ignore_errors=True)
    peak_mib = _status_kib("VmHWM") / 1024
    return {"target": name, "inputs": sum(counts.values()), **counts, "worst_s": worst, "peak_rss_mib": peak_mib,
            "first_crashes": crashes}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def bound_memory(extra_mib: int) -> None:
    """Address space limited to what the process maps now plus `extra_mib`: an input that makes a reader
    allocate more gets a MemoryError, which is not a typed error and so counts as a crash."""
    limit = (_status_kib("VmSize") + extra_mib * 1024) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="inputs per target")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=None, help="stop a target after this many seconds")
    ap.add_argument("--memory-mib", type=int, default=2048, help="address space allowed beyond the start's")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    names = args.targets.split(",")
    if args.child:  # one target in this process: its own peak RSS and memory bound
        torch.set_num_threads(1)
        bound_memory(args.memory_mib)
        print(json.dumps(run_target(names[0], args.n, args.seed, args.budget_s)))
        return 0
    print(f"load average {os.getloadavg()}; command: {' '.join(sys.argv)}")
    print(f"{'target':<16} {'inputs':>8} {'rejected':>9} {'accepted':>9} {'crashes':>8} {'worst s':>8} "
          f"{'peak RSS MiB':>13}")
    bad = 0
    for name in names:
        cmd = [sys.executable, __file__, "--child", "--targets", name, "--n", str(args.n), "--seed", str(args.seed),
               "--memory-mib", str(args.memory_mib)] + (["--budget-s", str(args.budget_s)] if args.budget_s else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:  # the process itself died (a segfault in a native reader, say): a crash
            print(f"{name:<16} process died with code {out.returncode}: {out.stderr[-1500:]}", flush=True)
            bad += 1
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name:<16} {r['inputs']:>8} {r['rejected']:>9} {r['accepted']:>9} {r['crash']:>8} "
              f"{r['worst_s']:>8.3f} {r['peak_rss_mib']:>13.0f}", flush=True)
        for c in r["first_crashes"]:
            print(c, file=sys.stderr)
        bad += r["crash"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
