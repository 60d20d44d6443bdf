"""A generation that fails mid-stream reaches the official clients as an error, not as a truncated stream."""

import httpx
import ollama
import openai
import pytest

from bench.serve_soak import FaultInjector

from .server_fixtures import live  # noqa: F401  (the module's server fixture)

MSG = [{"role": "user", "content": "Tell me a long story about llamas."}]


@pytest.fixture
def fault_on_third_step(live):
    """The engine's third step from now raises inside the forward (prefill, one decode step, then the fault):
    the request has streamed tokens when it fails."""
    faults = FaultInjector(live[1].engine, every=3)
    yield faults
    faults.remove()


def _served_after(live, faults) -> None:
    """The fault failed only its request: every KV block is free and the next request is answered."""
    faults.remove()
    server, served = live
    assert served.engine.cache.num_free == served.engine.cache.num_blocks
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 3}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_openai_chat_stream_ends_with_an_error_event(live, fault_on_third_step):
    client = openai.OpenAI(base_url=live[0].url + "/v1", api_key="none", max_retries=0)
    stream = client.chat.completions.create(model="tiny-llama3", messages=MSG, max_tokens=40, stream=True,
                                            extra_body={"ignore_eos": True})
    received = []
    with pytest.raises(openai.APIError) as err:
        for chunk in stream:
            received.append(chunk)
    # APIConnectionError (a cut connection) is an APIError too: the error must be the server's event
    assert type(err.value) is openai.APIError, repr(err.value)
    assert err.value.body["code"] == "generation_failed" and "injected fault" in err.value.message
    assert fault_on_third_step.count == 1 and len(received) >= 2  # the role chunk, then content, then the error
    _served_after(live, fault_on_third_step)


def test_openai_completion_stream_ends_with_an_error_event(live, fault_on_third_step):
    client = openai.OpenAI(base_url=live[0].url + "/v1", api_key="none", max_retries=0)
    stream = client.completions.create(model="tiny-llama3", prompt="Once upon a time", max_tokens=40, stream=True,
                                       extra_body={"ignore_eos": True})
    with pytest.raises(openai.APIError) as err:
        for _ in stream:
            pass
    assert type(err.value) is openai.APIError, repr(err.value)
    assert err.value.body["code"] == "generation_failed" and err.value.body["type"] == "server_error"
    _served_after(live, fault_on_third_step)


@pytest.mark.parametrize("route", ["chat", "generate"])
def test_ollama_stream_ends_with_an_error_line(live, fault_on_third_step, route):
    client = ollama.Client(host=live[0].url)
    options = {"num_predict": 40, "temperature": 0}
    if route == "chat":
        parts = client.chat(model="tiny-llama3", messages=MSG, stream=True, options=options)
    else:
        parts = client.generate(model="tiny-llama3", prompt="Once upon a time", stream=True, options=options)
    with pytest.raises(ollama.ResponseError, match="injected fault"):
        for part in parts:
            assert not part.done  # the final `done` line never comes: the error line replaces it
    _served_after(live, fault_on_third_step)


def test_ollama_error_line_is_the_last_line(live, fault_on_third_step):
    with httpx.stream("POST", live[0].url + "/api/generate", timeout=60,
                      json={"prompt": "Once upon a time", "options": {"num_predict": 40}}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.status_code == 200
    assert lines[-1].startswith('{"error": "generation failed') and all('"error"' not in x for x in lines[:-1])
    _served_after(live, fault_on_third_step)
