"""Aggregate decode throughput of `herd serve` over HTTP: one stream alone vs N concurrent streams.

Usage: .venv/bin/python bench/serve_throughput.py [--streams 8] [--max-tokens 64] [--repeat 3] [--dir /tmp/...]

Writes a random-weight Llama-3-shaped model (35.4M parameters, official Llama 3 tokenizer) as a Meta folder,
starts `herd serve` on it on a loopback port, then times /v1/completions streams with a fixed `max_tokens`
and `ignore_eos` (so every stream produces exactly that many tokens; the server's usage counts are checked).
Reports tokens/s for 1 stream and for N concurrent streams (generated tokens of all streams / wall time from
the first request sent to the last stream's end) and their ratio; best of `--repeat` runs for each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from bench.serve_common import BENCH_CONFIG, HerdServe, write_llama3_folder  # noqa: E402


async def one_stream(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> int:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    used = None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                if event.get("usage"):
                    used = event["usage"]["completion_tokens"]
    if used != max_tokens:
        raise RuntimeError(f"a stream produced {used} tokens, expected {max_tokens}")
    return used


async def run(url: str, streams: int, max_tokens: int) -> tuple[float, int]:
    """(wall seconds, generated tokens) for `streams` concurrent streams."""
    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        prompts = [f"Request {i}: tell me a long story about llamas number {i}." for i in range(streams)]
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one_stream(client, p, max_tokens) for p in prompts))
        return time.perf_counter() - t0, sum(counts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/llamaherd-serve-bench"))
    ap.add_argument("--threads", type=int, default=None, help="herd serve --threads (default: torch's choice)")
    ap.add_argument("--log", type=Path, default=None, help="server log file")
    args = ap.parse_args()

    folder = write_llama3_folder(args.dir / "model")
    print(f"model: {folder} (Llama 3 vocab, dim {BENCH_CONFIG.dim}, {BENCH_CONFIG.n_layers} layers, tied)")
    extra = ["--max-batch", str(max(16, args.streams))]
    if args.threads:
        extra += ["--threads", str(args.threads)]
    with HerdServe(folder, *extra, log=args.log) as server:
        asyncio.run(run(server.url, 1, 8))  # warm-up: first forward, allocator, HTTP stack
        single = [run_sync(server.url, 1, args.max_tokens) for _ in range(args.repeat)]
        multi = [run_sync(server.url, args.streams, args.max_tokens) for _ in range(args.repeat)]
    best1 = max(t / s for s, t in single)
    bestn = max(t / s for s, t in multi)
    print(f"1 stream : {best1:8.1f} tok/s   (runs: {', '.join(f'{t / s:.1f}' for s, t in single)})")
    print(f"{args.streams} streams: {bestn:8.1f} tok/s   (runs: {', '.join(f'{t / s:.1f}' for s, t in multi)})")
    print(f"ratio    : {bestn / best1:8.2f}x")


def run_sync(url: str, streams: int, max_tokens: int) -> tuple[float, int]:
    return asyncio.run(run(url, streams, max_tokens))


if __name__ == "__main__":
    main()
