"""`herd serve --speculative ngram` / `--draft`: greedy completions over HTTP, many at once, are the same text as
a server without speculation; every KV block comes back afterwards."""

import asyncio

import httpx

from llamaherd.api import Model

from .conftest import random_model
from .server_fixtures import CONFIG, start, tiny_llama3

PROMPTS = [f"{w} {w} and {w} {w} and {w}" for w in ("red apple", "blue sky", "one two three", "cats and dogs",
                                                        "x = y + 1;", "fn main() {}")]


def _complete_all(server) -> list[str]:
    async def one(client, prompt):
        r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 16, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            return await asyncio.gather(*(one(client, p) for p in PROMPTS))

    return asyncio.run(main())


def test_greedy_over_http_is_identical_with_speculation():
    plain_server, _ = start()
    try:
        plain = _complete_all(plain_server)
    finally:
        plain_server.stop()
    draft = Model(random_model(CONFIG, seed=1, std=0.5), tiny_llama3().checkpoint)
    for kwargs in ({"speculative": "ngram", "num_speculative_tokens": 4}, {"draft": draft, "num_speculative_tokens": 3}):
        server, served = start(**kwargs)
        try:
            assert _complete_all(server) == plain, kwargs
            stats = served.engine.stats
            assert stats["spec_proposed"] > 0 and stats["peak_decode_batch"] > 1
        finally:
            server.stop()
        assert served.engine.cache.num_free == served.engine.cache.num_blocks
