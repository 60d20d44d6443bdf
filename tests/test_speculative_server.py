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


def test_per_request_off_switch_through_the_openai_and_ollama_clients():
    """`speculative: false` (OpenAI extra body field) and `options.speculative=false` (Ollama) turn the server's
    speculation off for that request alone: nothing is proposed for it, and the text is the same."""
    import ollama
    import openai

    draft = Model(random_model(CONFIG, seed=1, std=0.5), tiny_llama3().checkpoint)  # proposes at every step
    server, served = start(draft=draft, num_speculative_tokens=3)
    stats = served.engine.stats
    try:
        oa = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        ol = ollama.Client(host=server.url)
        prompt, chat = PROMPTS[0], [{"role": "user", "content": PROMPTS[2]}]
        greedy = {"max_tokens": 16, "temperature": 0}
        options = {"num_predict": 16, "temperature": 0}
        requests = {
            "openai completions": lambda **off: oa.completions.create(
                model="tiny-llama3", prompt=prompt, **greedy, **({"extra_body": off} if off else {})).choices[0].text,
            "openai chat": lambda **off: oa.chat.completions.create(
                model="tiny-llama3", messages=chat, **greedy,
                **({"extra_body": off} if off else {})).choices[0].message.content,
            "ollama generate": lambda **off: ol.generate(model="tiny-llama3", prompt=prompt, raw=True,
                                                         options={**options, **off}).response,
            "ollama chat": lambda **off: ol.chat(model="tiny-llama3", messages=chat,
                                                 options={**options, **off}).message.content,
            "openai chat, streamed": lambda **off: "".join(
                c.choices[0].delta.content or "" for c in oa.chat.completions.create(
                    model="tiny-llama3", messages=chat, stream=True, **greedy, **({"extra_body": off} if off else {}))
                if c.choices),
            "ollama generate, streamed": lambda **off: "".join(
                c.response for c in ol.generate(model="tiny-llama3", prompt=prompt, raw=True, stream=True,
                                                options={**options, **off})),
        }
        for name, request in requests.items():
            before = stats["spec_proposed"]
            off = request(speculative=False)
            assert stats["spec_proposed"] == before, f"{name}: speculated although the request turned it off"
            on = request()
            assert stats["spec_proposed"] > before, f"{name}: the server's speculation did not run"
            assert on == off and on, name
    finally:
        server.stop()
