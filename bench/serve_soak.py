"""Bounded soak of `herd serve` on loopback: concurrent clients, mixed routes, random cancellations, RSS watched.

Usage: .venv/bin/python bench/serve_soak.py [--seconds 180] [--clients 32] [--seed 0] [--dir /tmp/...]

Starts `herd serve` (a random-weight Llama 3 model, official tokenizer, a deliberately small KV cache so that
preemption happens) on a free loopback port. Each of `--clients` clients loops until the time is up, sending
one of: OpenAI chat stream / non-stream, OpenAI completion stream with a stop string, Ollama generate stream,
Ollama chat, or a malformed request (must get a 4xx). About a third of the streams are abandoned after a few
chunks (the connection is closed). Every response is checked. The server's resident memory is sampled each
second; "warm-up" is the first quarter of the run. At the end the server must be idle with an empty KV cache.
Nothing leaves 127.0.0.1 and every loop is bounded by the deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import torch  # noqa: E402

from bench.serve_common import HerdServe, write_llama3_folder  # noqa: E402
from llamaherd.config import ModelConfig  # noqa: E402

SOAK_CONFIG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=64,
                          rope_theta=500000.0, max_seq_len=4096, tie_embeddings=True)
WORDS = "llama alpaca herd wool andes grass sky river stone fire story code tool json".split()


class Unexpected(Exception):
    """A response the soak did not expect: counted and reported."""


class InjectedFault(RuntimeError):
    """Raised inside an engine step by `FaultInjector`."""


class FaultInjector:
    """Makes every `every`-th engine step raise inside the model's forward, as a crashing kernel would. The
    engine must fail the requests it was running (their blocks freed) and keep serving the rest; `remove()`
    puts the engine back as it was."""

    def __init__(self, engine, every: int) -> None:
        self.count, self.steps, self._lock = 0, 0, threading.Lock()
        self._engine = engine
        self._original = run = engine._run

        def faulty(*args, **kwargs):
            with self._lock:
                self.steps += 1
                fire = self.steps % every == 0
                self.count += fire
            if fire:
                raise InjectedFault("injected fault")
            return run(*args, **kwargs)

        engine._run = faulty

    def remove(self) -> None:
        self._engine._run = self._original


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))


async def _sse_events(r: httpx.Response, abort_after: int | None):
    """(events, aborted): parsed `data:` payloads; stops early (closing the stream) after `abort_after`."""
    events, n = [], 0
    async for line in r.aiter_lines():
        if not line.startswith("data: "):
            continue
        events.append(line[6:])
        n += 1
        if abort_after is not None and n >= abort_after:
            return events, True
    return events, False


async def one_request(client: httpx.AsyncClient, rng: random.Random, stats: dict, stuck: bool = False) -> None:
    kind = rng.choices(["chat_stream", "chat", "completion_stream", "ollama_generate", "ollama_chat", "bad", "stuck"],
                       weights=[4, 2, 2, 2, 1, 1, 1 if stuck else 0])[0]
    max_tokens = rng.randint(1, 48)
    abort = rng.randint(1, 6) if rng.random() < 0.35 else None
    temperature = rng.choice([0.0, 0.7, 1.0])
    msgs = [{"role": "user", "content": _text(rng)}]
    if kind == "stuck":  # a client that opens a stream, reads one event, then reads nothing for seconds
        body = {"messages": msgs, "stream": True, "max_tokens": 48, "temperature": temperature}
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                raise Unexpected(f"stuck client's stream {r.status_code}")
            async for _ in r.aiter_lines():
                break
            await asyncio.sleep(rng.uniform(2, 6))
        stats["stuck_clients"] += 1
        return
    if kind == "bad":
        body = rng.choice([{"messages": []}, {"messages": msgs, "temperature": -1}, {"messages": msgs, "n": 0},
                           {"messages": msgs, "max_tokens": "x"}, {"model": "nope", "messages": msgs}])
        r = await client.post("/v1/chat/completions", json=body)
        if not 400 <= r.status_code < 500 or "error" not in r.json():
            raise Unexpected(f"bad request answered {r.status_code}: {r.text[:200]}")
        stats["rejected_as_expected"] += 1
        return
    if kind == "chat":
        r = await client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": max_tokens,
                                                           "temperature": temperature})
        if r.status_code != 200:
            raise Unexpected(f"chat {r.status_code}: {r.text[:200]}")
        usage = r.json()["usage"]["completion_tokens"]
        if not 1 <= usage <= max_tokens:
            raise Unexpected(f"chat produced {usage} tokens for max_tokens={max_tokens}")
        stats["tokens"] += usage
        stats["completed"] += 1
        return
    if kind == "ollama_chat":
        r = await client.post("/api/chat", json={"messages": msgs, "stream": False,
                                                 "options": {"num_predict": max_tokens, "temperature": temperature}})
        if r.status_code != 200 or not r.json().get("done"):
            raise Unexpected(f"ollama chat {r.status_code}: {r.text[:200]}")
        stats["tokens"] += r.json()["eval_count"]
        stats["completed"] += 1
        return
    if kind == "ollama_generate":
        body = {"prompt": _text(rng), "options": {"num_predict": max_tokens, "temperature": temperature}}
        async with client.stream("POST", "/api/generate", json=body) as r:
            if r.status_code != 200:
                raise Unexpected(f"ollama generate {r.status_code}")
            n, last = 0, None
            async for line in r.aiter_lines():
                if line:
                    last = json.loads(line)
                    n += 1
                    if "error" in last:  # a failed generation's last line
                        raise Unexpected(f"ollama generate error line: {last['error']}")
                    if abort is not None and n >= abort and not last["done"]:
                        stats["cancelled"] += 1
                        return
        if not last or not last["done"] or last["eval_count"] > max_tokens:
            raise Unexpected(f"ollama generate ended badly: {last}")
        stats["tokens"] += last["eval_count"]
        stats["completed"] += 1
        return
    if kind == "chat_stream":
        path, body = "/v1/chat/completions", {"messages": msgs, "stream": True, "max_tokens": max_tokens,
                                              "temperature": temperature, "stream_options": {"include_usage": True}}
    else:
        path, body = "/v1/completions", {"prompt": _text(rng), "stream": True, "max_tokens": max_tokens,
                                         "temperature": temperature, "stop": [rng.choice(WORDS)],
                                         "stream_options": {"include_usage": True}}
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            raise Unexpected(f"{path} stream {r.status_code}")
        events, aborted = await _sse_events(r, abort)
    if aborted and events[-1] != "[DONE]":
        stats["cancelled"] += 1
        return
    if events and '"error"' in events[-1]:  # a failed generation's last event
        raise Unexpected(f"{path} stream error event: {events[-1][:300]}")
    if not events or events[-1] != "[DONE]":
        raise Unexpected(f"{path} stream ended without [DONE]")
    usage = json.loads(events[-2]).get("usage") or {}
    if not usage or usage["completion_tokens"] > max_tokens:
        raise Unexpected(f"{path} stream usage {usage} for max_tokens={max_tokens}")
    stats["tokens"] += usage["completion_tokens"]
    stats["completed"] += 1


async def client_loop(url: str, seed: int, deadline: float, stats: dict, faults: FaultInjector | None = None,
                      stuck: bool = False) -> None:
    rng = random.Random(seed)
    while time.time() < deadline:
        # A new connection pool after a fault cut a stream, as a real client does with a broken connection.
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            while time.time() < deadline:
                stats["requests"] += 1
                before = faults.count if faults else 0
                try:
                    await one_request(client, rng, stats, stuck)
                except (Unexpected, httpx.HTTPError, ValueError, KeyError) as exc:
                    if faults is not None and faults.count > before and _fault_shaped(exc):
                        stats["failed_by_injected_fault"] += 1  # a fault fired while it ran: failing is correct
                        break
                    stats["unexpected"] += 1
                    if len(stats["errors"]) < 10:
                        stats["errors"].append(f"{type(exc).__name__}: {exc}")


def _fault_shaped(exc: Exception) -> bool:
    """What a request running in a failed engine step sees: a 500 (generation_failed), or a stream that ends
    with an error event (SSE) or error line (NDJSON) saying so. A connection cut is never fault-shaped: the
    server ends a failed stream properly."""
    text = str(exc)
    return isinstance(exc, Unexpected) and (" 500" in text or "generation failed" in text)


def soak(url: str, pid: int, seconds: float, clients: int = 32, seed: int = 0, faults: FaultInjector | None = None,
         stuck: bool = False) -> dict:
    """Run the soak against the server at `url` (process `pid`, for its RSS); figures as a dict (RSS in MiB).
    With `faults` (installed on the server's engine, same process) requests a fault hit may fail; `stuck` adds
    clients that stop reading their stream for seconds."""
    import psutil

    proc = psutil.Process(pid)
    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample() -> None:
        t0 = time.time()
        while not done.is_set():
            samples.append((time.time() - t0, proc.memory_info().rss / 2**20))
            done.wait(1.0)

    stats = {"requests": 0, "completed": 0, "cancelled": 0, "rejected_as_expected": 0, "unexpected": 0,
             "tokens": 0, "stuck_clients": 0, "failed_by_injected_fault": 0, "errors": []}
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.time()

    async def main() -> None:
        deadline = started + seconds
        await asyncio.gather(*(client_loop(url, seed * 1000 + i, deadline, stats, faults, stuck)
                               for i in range(clients)))

    asyncio.run(main())
    elapsed = time.time() - started
    idle = _wait_idle(url, timeout=30)
    done.set()
    sampler.join()
    warm = [rss for t, rss in samples if t <= seconds / 4] or [samples[0][1]]
    after = [rss for t, rss in samples if t > seconds / 4] or warm
    half = len(after) // 2
    return {**stats, "faults_injected": faults.count if faults else 0, "seconds": round(elapsed, 1),
            "rss_start_mib": round(samples[0][1], 1), "clients": clients,
            "tok_per_s": round(stats["tokens"] / elapsed, 1),
            "rss_after_warmup_mib": round(warm[-1], 1), "rss_max_after_warmup_mib": round(max(after), 1),
            "rss_end_mib": round(after[-1], 1),
            "rss_growth_second_half_mib": round(max(after[half:]) - max(after[: max(half, 1)]), 1),
            "rss_every_30s_mib": [round(min(samples, key=lambda x: abs(x[0] - k))[1])
                                  for k in range(0, int(samples[-1][0]) + 1, 30)],
            **idle}


def _wait_idle(url: str, timeout: float) -> dict:
    """Poll /metrics until nothing runs or waits; report the KV-cache usage and preemptions seen."""
    deadline, m = time.time() + timeout, {}
    while time.time() < deadline:
        text = httpx.get(url + "/metrics", timeout=10).text
        m = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
             if line and not line.startswith("#") and len(line.split()) == 2}
        if m["herd_requests_running"] == 0 and m["herd_requests_waiting"] == 0 and m["herd_kv_cache_usage_ratio"] == 0:
            break
        time.sleep(0.1)
    return {"idle_running": int(m.get("herd_requests_running", -1)),
            "idle_waiting": int(m.get("herd_requests_waiting", -1)),
            "idle_kv_cache_usage": m.get("herd_kv_cache_usage_ratio"),
            "preemptions": int(m.get("herd_preemptions_total", 0)),
            "server_requests_total": int(m.get("herd_requests_total", 0))}


def start_server(folder: Path, log: Path | None = None) -> HerdServe:
    # 0.5 MiB of KV cache = 64 blocks of 16 tokens (1,024 tokens) for this model: 32 clients overflow it, so
    # preemption runs all the time.
    return HerdServe(folder, "--threads", "1", "--kv-cache-gb", str(0.5 / 1024), "--max-batch", "32",
                     "--max-waiting", "64", name="soak", log=log)


def fault_soak(folder: Path, seconds: float, clients: int, seed: int, every: int) -> dict:
    """The soak with faults: the server in this process (uvicorn on a thread) so that a `FaultInjector` can sit
    in its engine; clients that stop reading join the mix. RSS is this process's (server and clients)."""
    import uvicorn

    from bench.serve_common import free_port
    from llamaherd.api import load
    from llamaherd.memory import kv_bytes_per_token
    from llamaherd.server import ServedModel, create_app
    from llamaherd.server.http import KEEP_ALIVE_S

    torch.set_num_threads(1)
    # 64 blocks of 16 tokens, as start_server's herd serve: preemption all the time.
    served = ServedModel(load(folder), "soak", kv_cache_bytes=64 * 16 * kv_bytes_per_token(SOAK_CONFIG, torch.float32),
                         max_batch=32, max_waiting=2 * clients)  # abandoned streams linger: no 429s
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(served), host="127.0.0.1", port=port, log_level="critical",
                                           timeout_keep_alive=KEEP_ALIVE_S))  # as herd serve
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    cache = served.engine.cache
    free_start = cache.num_free
    faults = FaultInjector(served.engine, every)
    try:
        figures = soak(f"http://127.0.0.1:{port}", os.getpid(), seconds, clients, seed, faults=faults, stuck=True)
    finally:
        server.should_exit = True
        thread.join(30)
    return {**figures, "kv_blocks": cache.num_blocks, "kv_free_start": free_start, "kv_free_end": cache.num_free,
            "exit_code": 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=180)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/llamaherd-serve-soak"))
    ap.add_argument("--log", type=Path, default=None)
    ap.add_argument("--fault-every", type=int, default=0,
                    help="make every N-th engine step raise (in-process server, with stuck clients too)")
    args = ap.parse_args()
    print(f"load average {os.getloadavg()}; command: {' '.join(sys.argv)}")
    folder = write_llama3_folder(args.dir / "model", SOAK_CONFIG)
    if args.fault_every > 0:
        figures = fault_soak(folder, args.seconds, args.clients, args.seed, args.fault_every)
        code = 0 if figures["kv_free_end"] == figures["kv_free_start"] else 1
    else:
        with start_server(folder, args.log) as server:
            figures = soak(server.url, server.proc.pid, args.seconds, args.clients, args.seed)
            code = server.stop()
    figures["exit_code"] = code
    for k, v in figures.items():
        print(f"{k:28s} {v}")
    ok = figures["unexpected"] == 0 and figures["idle_kv_cache_usage"] == 0 and code == 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
