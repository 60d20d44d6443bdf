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
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from bench.serve_common import HerdServe, write_llama3_folder  # noqa: E402
from llamaherd.config import ModelConfig  # noqa: E402

SOAK_CONFIG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=64,
                          rope_theta=500000.0, max_seq_len=4096, tie_embeddings=True)
WORDS = "llama alpaca herd wool andes grass sky river stone fire story code tool json".split()


class Unexpected(Exception):
    """A response the soak did not expect: counted and reported."""


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


async def one_request(client: httpx.AsyncClient, rng: random.Random, stats: dict) -> None:
    kind = rng.choices(["chat_stream", "chat", "completion_stream", "ollama_generate", "ollama_chat", "bad"],
                       weights=[4, 2, 2, 2, 1, 1])[0]
    max_tokens = rng.randint(1, 48)
    abort = rng.randint(1, 6) if rng.random() < 0.35 else None
    temperature = rng.choice([0.0, 0.7, 1.0])
    msgs = [{"role": "user", "content": _text(rng)}]
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
    if events[-1] != "[DONE]":
        raise Unexpected(f"{path} stream ended without [DONE]")
    usage = json.loads(events[-2]).get("usage") or {}
    if not usage or usage["completion_tokens"] > max_tokens:
        raise Unexpected(f"{path} stream usage {usage} for max_tokens={max_tokens}")
    stats["tokens"] += usage["completion_tokens"]
    stats["completed"] += 1


async def client_loop(url: str, seed: int, deadline: float, stats: dict) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        while time.time() < deadline:
            stats["requests"] += 1
            try:
                await one_request(client, rng, stats)
            except (Unexpected, httpx.HTTPError, ValueError, KeyError) as exc:
                stats["unexpected"] += 1
                if len(stats["errors"]) < 10:
                    stats["errors"].append(f"{type(exc).__name__}: {exc}")


def soak(url: str, pid: int, seconds: float, clients: int = 32, seed: int = 0) -> dict:
    """Run the soak against the server at `url` (process `pid`, for its RSS); figures as a dict (RSS in MiB)."""
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
             "tokens": 0, "errors": []}
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.time()

    async def main() -> None:
        deadline = started + seconds
        await asyncio.gather(*(client_loop(url, seed * 1000 + i, deadline, stats) for i in range(clients)))

    asyncio.run(main())
    elapsed = time.time() - started
    idle = _wait_idle(url, timeout=30)
    done.set()
    sampler.join()
    warm = [rss for t, rss in samples if t <= seconds / 4] or [samples[0][1]]
    after = [rss for t, rss in samples if t > seconds / 4] or warm
    half = len(after) // 2
    return {**stats, "seconds": round(elapsed, 1), "clients": clients, "tok_per_s": round(stats["tokens"] / elapsed, 1),
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=180)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/llamaherd-serve-soak"))
    ap.add_argument("--log", type=Path, default=None)
    args = ap.parse_args()
    folder = write_llama3_folder(args.dir / "model", SOAK_CONFIG)
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
