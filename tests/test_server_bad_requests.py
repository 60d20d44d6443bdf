"""Every malformed request gets a 4xx with OpenAI's error JSON (never a 5xx), and the server keeps serving."""

import httpx
import pytest

from .server_fixtures import live, start  # noqa: F401  (live: the module's server fixture)

MSG = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"


def chat(**kw):
    return ("POST", CHAT, {"model": "tiny-llama3", "messages": MSG, "max_tokens": 2, **kw})


def comp(**kw):
    return ("POST", COMP, {"model": "tiny-llama3", "prompt": "hi", "max_tokens": 2, **kw})


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
CASES = {
    "invalid json": ("POST", CHAT, b"{not json"),
    "json array body": ("POST", CHAT, []),
    "empty body": ("POST", CHAT, b""),
    "missing messages": ("POST", CHAT, {"model": "tiny-llama3"}),
    "empty messages": chat(messages=[]),
    "messages not a list": chat(messages="hello"),
    "message without role": chat(messages=[{"content": "x"}]),
    "unknown role": chat(messages=[{"role": "wizard", "content": "x"}]),
    "user message without content": chat(messages=[{"role": "user"}]),
    "content wrong type": chat(messages=[{"role": "user", "content": 42}]),
    "audio content part": chat(messages=[{"role": "user", "content": [{"type": "input_audio",
                                                                       "input_audio": {"data": "", "format": "wav"}}]}]),
    "unknown model": chat(model="gpt-4o"),
    "negative max_tokens": chat(max_tokens=-1),
    "huge max_tokens": chat(max_tokens=10**12),
    "max_tokens string": chat(max_tokens="lots"),
    "max_completion_tokens negative": chat(max_completion_tokens=-5),
    "NaN temperature": ("POST", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'),
    "infinite temperature": ("POST", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}'),
    "negative temperature": chat(temperature=-0.5),
    "temperature too high": chat(temperature=7),
    "top_p zero": chat(top_p=0),
    "top_p above one": chat(top_p=1.5),
    "top_k below -1": chat(top_k=-3),
    "min_p above one": chat(min_p=2),
    "presence_penalty out of range": chat(presence_penalty=5),
    "frequency_penalty out of range": chat(frequency_penalty=-9),
    "repetition_penalty zero": chat(repetition_penalty=0),
    "n zero": chat(n=0),
    "n huge": chat(n=1000),
    "stop not strings": chat(stop=[1, 2]),
    "stop empty string": chat(stop=[""]),
    "too many stops": chat(stop=[str(i) for i in range(40)]),
    "logit_bias non-numeric key": chat(logit_bias={"abc": 1}),
    "logit_bias out of range": chat(logit_bias={"5": 500}),
    "logit_bias token outside vocab": chat(logit_bias={"999999999": 1}),
    "top_logprobs too many": chat(logprobs=True, top_logprobs=50),
    "seed not an integer": chat(seed="abc"),
    "tools not a list": chat(tools={"type": "function"}),
    "tool without function": chat(tools=[{"type": "function"}]),
    "tool with empty name": chat(tools=[{"type": "function", "function": {"name": ""}}]),
    "tool parameters not object schema": chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]),
    "tool type unknown": chat(tools=[{"type": "retrieval", "function": {"name": "f"}}]),
    "tool_choice unknown string": chat(tools=[TOOL], tool_choice="sometimes"),
    "tool_choice names missing tool": chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "g"}}),
    "tool_choice dict without name": chat(tools=[TOOL], tool_choice={"type": "function"}),
    "response_format unknown type": chat(response_format={"type": "xml"}),
    "json_schema without schema": chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
    "stream not bool": chat(stream="maybe"),
    "prompt longer than the context": chat(messages=[{"role": "user", "content": "word " * 3000}]),
    "completion prompt missing": ("POST", COMP, {"model": "tiny-llama3"}),
    "completion prompt empty list": comp(prompt=[]),
    "completion token ids out of vocab": comp(prompt=[1, 2, 10**9]),
    "completion negative token id": comp(prompt=[-1]),
    "completion prompt wrong type": comp(prompt={"text": "x"}),
    "completion logprobs too many": comp(logprobs=100),
    "completion echo not bool": comp(echo="yes please"),
    "completion over-long token prompt": comp(prompt=[1] * 5000),
    "ollama generate bad options": ("POST", "/api/generate", {"model": "tiny-llama3", "prompt": "x", "options": {"temperature": -1}}),
    "ollama generate unknown model": ("POST", "/api/generate", {"model": "nope", "prompt": "x"}),
    "ollama chat bad role": ("POST", "/api/chat", {"model": "tiny-llama3", "messages": [{"role": "robot", "content": "x"}]}),
    "ollama chat num_ctx too large": ("POST", "/api/chat", {"model": "tiny-llama3", "messages": MSG, "options": {"num_ctx": 10**7}}),
    "ollama bad format": ("POST", "/api/generate", {"model": "tiny-llama3", "prompt": "x", "format": "yaml"}),
    "ollama show without model": ("POST", "/api/show", {}),
    "ollama show unknown model": ("POST", "/api/show", {"model": "nope"}),
    "tokenize without text": ("POST", "/tokenize", {}),
    "detokenize bad ids": ("POST", "/detokenize", {"tokens": [10**9]}),
    "detokenize not ints": ("POST", "/detokenize", {"tokens": ["a"]}),
    "unknown route": ("GET", "/v1/nothing-here", None),
    "wrong method": ("GET", CHAT, None),
    "oversized body": ("POST", CHAT, b'{"messages": [{"role": "user", "content": "' + b"x" * (9 << 20) + b'"}]}'),
}


def test_there_are_at_least_fifty_cases():
    assert len(CASES) >= 50


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_request_gets_4xx_json(live, name):
    method, path, body = CASES[name]
    with httpx.Client(base_url=live[0].url, timeout=60) as client:
        if isinstance(body, bytes):
            r = client.request(method, path, content=body, headers={"content-type": "application/json"})
        elif body is None:
            r = client.request(method, path)
        else:
            r = client.request(method, path, json=body)
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"]
        ok = client.post(CHAT, json={"model": "tiny-llama3", "messages": MSG, "max_tokens": 2})
        assert ok.status_code == 200, ok.text[:300]


def test_api_key_guards_every_route_but_health():
    server, _ = start(api_key="s3cret")
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            assert c.get("/health").status_code == 200
            assert c.get("/v1/models").status_code == 401
            assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
            assert c.post("/api/tags").status_code in (401, 405)
    finally:
        server.stop()


def test_queue_bound_answers_429():
    server, served = start(max_batch=1, max_waiting=1)
    try:
        import concurrent.futures as cf

        body = {"model": "tiny-llama3", "messages": MSG, "max_tokens": 64, "temperature": 0, "ignore_eos": True}
        with httpx.Client(base_url=server.url, timeout=120) as c, cf.ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(lambda _: c.post(CHAT, json=body).status_code, range(6)))
        assert 429 in codes and 200 in codes and all(code in (200, 429) for code in codes)
    finally:
        server.stop()


def test_ops_routes(live):
    with httpx.Client(base_url=live[0].url, timeout=30) as c:
        a = c.post("/tokenize", json={"content": "Hello world"}).json()["tokens"]  # llama.cpp: no BOS by default
        b = c.post("/tokenize", json={"prompt": "Hello world"}).json()["tokens"]  # vLLM: BOS by default
        tok = live[1].tokenizer
        assert a == tok.encode("Hello world") and b == [tok.bos_id, *a]
        d = c.post("/detokenize", json={"tokens": a}).json()
        assert d["content"] == d["prompt"] == "Hello world"
        c.post(CHAT, json={"model": "tiny-llama3", "messages": MSG, "max_tokens": 3})
        text = c.get("/metrics").text
        for name in ("herd_requests_running", "herd_requests_waiting", "herd_kv_cache_usage_ratio",
                     "herd_prompt_tokens_total", "herd_generation_tokens_total",
                     "herd_time_to_first_token_seconds_bucket", "herd_inter_token_latency_seconds_count"):
            assert name in text
        assert c.get("/").text == "Ollama is running"
        assert "version" in c.get("/api/version").json()
        assert c.get("/api/ps").json()["models"][0]["name"] == "tiny-llama3"


def test_json_body_without_json_content_type_is_accepted(live):
    # `curl URL -d '{...}'` (Ollama's documented usage) sends application/x-www-form-urlencoded.
    body = b'{"model": "tiny-llama3", "prompt": "Hi", "stream": false, "options": {"num_predict": 2}}'
    with httpx.Client(base_url=live[0].url, timeout=60) as c:
        for ctype in ("application/x-www-form-urlencoded", None):
            headers = {"content-type": ctype} if ctype else {}
            r = c.post("/api/generate", content=body, headers=headers)
            assert r.status_code == 200 and r.json()["done"] is True, r.text[:200]


def test_base_model_without_chat_format_completes_raw_prompts(tmp_path):
    """Ollama's /api/generate on a model with no template uses the prompt as it is ({{ .Prompt }});
    the chat routes answer 400 saying the model has no chat format."""
    from llamaherd import load
    from llamaherd.server import ServedModel

    from .server_fixtures import LiveServer
    from .store_fixtures import random_gemma_state, write_tiny_gemma_gguf

    model = load(write_tiny_gemma_gguf(tmp_path / "base.gguf", random_gemma_state()))
    assert not model.has_chat_format
    server = LiveServer(ServedModel(model, "base", kv_cache_bytes=8 << 20))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            r = c.post("/api/generate", json={"prompt": "ab", "stream": False, "options": {"num_predict": 3}})
            assert r.status_code == 200 and r.json()["prompt_eval_count"] == len(model.tokenizer.encode("ab", bos=True))
            r = c.post(CHAT, json={"messages": MSG, "max_tokens": 2})
            assert r.status_code == 400 and "chat format" in r.json()["error"]["message"]
    finally:
        server.stop()


@pytest.mark.parametrize("route, body, field", [
    ("/api/chat", {"options": {"temperature": 1e308}}, "options.temperature"),
    ("/api/chat", {"options": {"seed": 2**70}}, "options.seed"),
    ("/api/chat", {"options": {"top_p": 1e308}}, "options.top_p"),
    (CHAT, {"temperature": 1e308}, "temperature"),
    (CHAT, {"seed": -(2**64)}, "seed"),
])
def test_sampling_parameters_out_of_range_are_400_naming_the_field(live, route, body, field):
    r = httpx.post(live[0].url + route, json={"messages": MSG, "stream": False, **body}, timeout=60)
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"]["param"] == field and field in r.json()["error"]["message"]


@pytest.mark.parametrize("route, body", [
    ("/api/chat", {"options": {"temperature": 1e-320, "num_predict": 4}}),
    ("/api/chat", {"options": {"repeat_penalty": 1e-300, "top_k": 2**63, "num_predict": 4}}),
    (CHAT, {"temperature": 1e-320, "max_tokens": 4}),
    (CHAT, {"repetition_penalty": 1e308, "frequency_penalty": 2, "max_tokens": 4}),
])
def test_extreme_but_valid_sampling_parameters_generate(live, route, body):
    # these reached the sampler as NaN probabilities (a 500) before: now each is the distribution's limit
    r = httpx.post(live[0].url + route, json={"messages": MSG, "stream": False, **body}, timeout=60)
    assert r.status_code == 200, r.text[:300]
