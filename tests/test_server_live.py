"""Over real HTTP: batching changes no greedy output, and aborted streams give every KV block back."""

import asyncio
import json
import time

import httpx
import pytest
import torch

from .server_fixtures import start


@pytest.fixture(scope="module")
def live():
    server, served = start(max_batch=16, max_waiting=64)
    yield server, served
    server.stop()


def reference_greedy(net, prompt: list[int], n: int) -> list[int]:
    """Argmax of full-sequence forwards from position 0, no cache: what every engine path must reproduce."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(net(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


async def completion_tokens(client: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> list[str]:
    """Greedy /v1/completions on token ids; the generated tokens as the server reports them (logprobs.tokens)."""
    r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                                   "ignore_eos": True, "logprobs": 0})
    r.raise_for_status()
    choice = r.json()["choices"][0]
    return choice["logprobs"]["tokens"]


def test_greedy_alone_equals_among_seven_concurrent_others(live):
    server, served = live
    tok = served.tokenizer
    target = tok.encode("The quick brown fox jumps over the lazy dog", bos=True)
    others = [tok.encode(f"Request number {i}: " + "llama " * (3 * i), bos=True) for i in range(7)]
    n = 24

    async def alone():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            return await completion_tokens(c, target, n)

    async def among():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            # Others get longer outputs so they are still decoding for the whole of the target's run.
            jobs = [completion_tokens(c, p, n + 8) for p in others[:3]] + [completion_tokens(c, target, n)] + [
                completion_tokens(c, p, n + 8) for p in others[3:]]
            return (await asyncio.gather(*jobs))[3]

    solo = asyncio.run(alone())
    served.engine.stats["peak_decode_batch"] = 0
    batched = asyncio.run(among())
    assert served.engine.stats["peak_decode_batch"] >= 6, "the requests never shared a decode step"
    assert batched == solo
    expected = [tok.token_bytes(t).decode("utf-8", "replace") for t in reference_greedy(served.model.net, target, n)]
    assert solo == expected


def test_fifty_aborted_streams_return_every_block(live):
    server, served = live
    cache = served.engine.cache
    free_before = cache.num_free
    generated_before = served.engine.stats["generated_tokens"]
    read_chunks: list[int] = []

    async def abort_one(client: httpx.AsyncClient, i: int) -> None:
        body = {"messages": [{"role": "user", "content": f"Tell story {i} " + "again " * (i % 9)}], "stream": True,
                "max_tokens": 500, "ignore_eos": True, "temperature": 1.0, "seed": i}
        got = 0
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    got += 1
                    if got == 3:
                        break  # leaving the block closes the connection mid-stream
        read_chunks.append(got)

    async def main():
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)  # one socket per stream
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
            await asyncio.gather(*(abort_one(client, i) for i in range(50)))

    asyncio.run(main())
    assert read_chunks == [3] * 50
    deadline = time.time() + 5
    while (cache.num_free != free_before or served.engine.num_running or served.engine.num_waiting) \
            and time.time() < deadline:
        time.sleep(0.05)
    assert served.engine.num_running == 0 and served.engine.num_waiting == 0
    assert cache.num_free == free_before
    # Cancellation reached the engine: far fewer tokens than 50 streams of 500 were generated.
    assert served.engine.stats["generated_tokens"] - generated_before < 50 * 40
    # ... and the server still answers.
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3, "temperature": 0}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def _sse_json(r: httpx.Response) -> list[dict]:
    lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_n3_stream_interleaves_choices_and_matches_non_streaming(live):
    server, served = live
    body = {"messages": [{"role": "user", "content": "Three stories"}], "n": 3, "max_tokens": 20,
            "temperature": 0.9, "seed": 7, "ignore_eos": True}
    full = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120).json()
    served.engine.stats["peak_decode_batch"] = 0
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        events = _sse_json(r)
    assert served.engine.stats["peak_decode_batch"] >= 3, "the three choices did not decode together"
    order = [e["choices"][0]["index"] for e in events]
    texts, finished = {0: "", 1: "", 2: ""}, []
    for e in events:
        c = e["choices"][0]
        assert c["index"] not in finished, "a chunk arrived after its choice's finish chunk"
        texts[c["index"]] += c["delta"].get("content") or ""
        if c["finish_reason"]:
            finished.append(c["index"])
    assert sorted(finished) == [0, 1, 2]
    assert order[:3] == [0, 1, 2]  # the role chunks open every choice first
    content = order[3:]
    assert any(a != b for a, b in zip(content, content[1:])) and content != sorted(content), "not interleaved"
    assert [texts[i] for i in range(3)] == [c["message"]["content"] for c in full["choices"]]


def test_n2_json_schema_each_choice_valid(live):
    server, _ = live
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["a"], "additionalProperties": False}
    body = {"messages": [{"role": "user", "content": "JSON"}], "n": 2, "max_tokens": 60, "temperature": 1.0,
            "seed": 5, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
    for stream in (False, True):
        if stream:
            with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True},
                              timeout=120) as r:
                events = _sse_json(r)
            outs = ["".join(e["choices"][0]["delta"].get("content") or "" for e in events
                            if e["choices"][0]["index"] == i) for i in range(2)]
        else:
            r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120).json()
            outs = [c["message"]["content"] for c in r["choices"]]
        for out in outs:
            value = json.loads(out)  # each choice followed its own grammar state to a complete object
            assert set(value) == {"a"} and 0 <= value["a"] <= 99


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 3000}], "stream": True}),
    ("/v1/completions", {"prompt": "hi " * 3000, "stream": True}),
    ("/api/chat", {"messages": [{"role": "user", "content": "hi " * 3000}]}),
])
def test_streaming_request_errors_come_as_status_codes(live, path, body):
    r = httpx.post(live[0].url + path, json=body, timeout=60)
    assert 400 <= r.status_code < 500 and r.json()["error"]["message"], r.text[:300]


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                              "parameters": {"type": "object", "required": ["city"],
                                                             "properties": {"city": {"type": "string", "maxLength": 12}},
                                                             "additionalProperties": False}}}


@pytest.mark.parametrize("tool_choice", ["auto", "required"])
def test_streamed_tool_calls_and_content_equal_non_streaming(live, tool_choice):
    server, _ = live
    body = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER],
            "tool_choice": tool_choice, "max_tokens": 60, "temperature": 0.7, "seed": 3}
    full = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120).json()["choices"][0]
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        events = _sse_json(r)
    deltas = [e["choices"][0]["delta"] for e in events]
    content = "".join(d.get("content") or "" for d in deltas)
    calls = [c for d in deltas for c in d.get("tool_calls") or []]
    assert content == (full["message"]["content"] or "")
    strip = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
    assert strip == [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                     for c in full["message"].get("tool_calls") or []]
    assert events[-1]["choices"][0]["finish_reason"] == full["finish_reason"]
    if tool_choice == "required":
        assert strip and strip[0][0] == "get_weather" and full["finish_reason"] == "tool_calls"
    else:  # a random model answers in text: it must have streamed in several pieces, not one at the end
        assert sum(1 for d in deltas if d.get("content")) > 3


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Go on"}], "max_tokens": 1900, "n": 2}),
    ("/v1/completions", {"prompt": "Go on", "max_tokens": 1900}),
    ("/api/generate", {"prompt": "Go on", "stream": False, "options": {"num_predict": 1900}}),
])
def test_non_streaming_request_abandoned_by_its_client_is_cancelled(live, path, body):
    server, served = live
    generated_before = served.engine.stats["generated_tokens"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + path, json={**body, "ignore_eos": True, "temperature": 0}, timeout=1.0)
    deadline = time.time() + 5
    while (served.engine.num_running or served.engine.num_waiting) and time.time() < deadline:
        time.sleep(0.05)
    assert served.engine.num_running == 0 and served.engine.num_waiting == 0
    assert served.engine.stats["generated_tokens"] - generated_before < 1500  # far from 1900 (x n)
    assert served.engine.cache.num_free == served.engine.cache.num_blocks


def test_failed_engine_step_is_a_500_and_the_server_goes_on(live):
    server, served = live
    net = served.engine.net

    def broken(*args, **kwargs):
        raise RuntimeError("injected fault")

    served.engine.net = broken
    try:
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=60)
    finally:
        served.engine.net = net
    assert r.status_code == 500 and "injected fault" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "server_error"
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=60)
    assert ok.status_code == 200 and served.engine.cache.num_free == served.engine.cache.num_blocks
