"""The server through the official `openai` and `ollama` clients, on a real uvicorn on loopback."""

import json

import jsonschema
import pytest

from .server_fixtures import live  # noqa: F401  (the module's server fixture)


@pytest.fixture
def oa(live):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=live[0].url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def ol(live):
    ollama = pytest.importorskip("ollama")
    return ollama.Client(host=live[0].url, timeout=60)


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                              "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                                                             "required": ["city"], "additionalProperties": False}}}


def test_models(oa):
    assert [m.id for m in oa.models.list().data] == ["tiny-llama3"]


def test_chat_completion(oa):
    r = oa.chat.completions.create(model="tiny-llama3", messages=[{"role": "user", "content": "Hello"}], max_tokens=8,
                                   temperature=0)
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens <= 8
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens > 5


def test_streaming_with_usage_equals_non_streaming(oa):
    kwargs = dict(model="tiny-llama3", messages=[{"role": "user", "content": "Count"}], max_tokens=10, temperature=0)
    full = oa.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(oa.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_seeded_sampling_is_reproducible(oa):
    kwargs = dict(model="tiny-llama3", messages=[{"role": "user", "content": "Hi"}], max_tokens=12, temperature=1.0,
                  seed=1234)
    a = oa.chat.completions.create(**kwargs).choices[0].message.content
    b = oa.chat.completions.create(**kwargs).choices[0].message.content
    assert a == b


def test_json_schema_output_validates(oa):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150}}, "required": ["name", "age"],
              "additionalProperties": False}
    r = oa.chat.completions.create(model="tiny-llama3", messages=[{"role": "user", "content": "A person as JSON"}],
                                   max_tokens=200, temperature=0.7, seed=3,
                                   response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_tool_call_round_trip(oa):
    r = oa.chat.completions.create(model="tiny-llama3", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                   tools=[WEATHER], tool_choice="required", max_tokens=150, temperature=0.7, seed=1)
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and calls[0].function.name == "get_weather"
    args = json.loads(calls[0].function.arguments)
    assert isinstance(args["city"], str)
    follow = oa.chat.completions.create(model="tiny-llama3", max_tokens=5, temperature=0, tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": json.dumps({"temp_c": 21})}])
    assert follow.choices[0].message.role == "assistant"


def test_completions_with_logprobs(oa):
    r = oa.completions.create(model="tiny-llama3", prompt="The sky is", max_tokens=5, temperature=0, logprobs=3,
                              echo=True)
    c = r.choices[0]
    assert c.text.startswith("The sky is")
    # echo + logprobs covers the prompt's tokens too (OpenAI's legacy completions, as lm-eval reads them)
    n = r.usage.prompt_tokens + r.usage.completion_tokens
    assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) == n
    k = r.usage.completion_tokens
    for lp, top in zip(c.logprobs.token_logprobs[-k:], c.logprobs.top_logprobs[-k:]):
        assert lp <= 0 and len(top) == 3 and max(top.values()) >= lp - 1e-5  # greedy: chosen is the best


def test_token_id_prompts(oa, live):
    ids = live[1].tokenizer.encode("Hello", bos=True)
    r = oa.completions.create(model="tiny-llama3", prompt=ids, max_tokens=3, temperature=0)
    assert r.usage.prompt_tokens == len(ids)


def test_ollama_generate_chat_tags_show(ol):
    r = ol.generate(model="tiny-llama3", prompt="Why?", options={"num_predict": 6, "temperature": 0})
    assert r.done and r.eval_count <= 6
    parts = list(ol.chat(model="tiny-llama3", messages=[{"role": "user", "content": "Hi"}], stream=True,
                         options={"num_predict": 6, "temperature": 0}))
    assert parts[-1].done and all(not p.done for p in parts[:-1])
    assert [m.model for m in ol.list().models] == ["tiny-llama3"]
    info = ol.show("tiny-llama3")
    assert info.details.family == "llama"


def test_ollama_tools(ol):
    r = ol.chat(model="tiny-llama3", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER],
                options={"num_predict": 30, "temperature": 0})
    assert r.message.role == "assistant"
    for call in r.message.tool_calls or []:
        assert isinstance(call.function.arguments, dict)  # Ollama sends arguments as objects
