"""Shields in `herd serve` end to end: a live server, the official openai client, and a guard model whose verdict
is "unsafe" exactly when a trigger token is in the conversation (weight edits, tests/guard_fixtures.py), run on
its own continuous-batching engine (guard/batched.py) as `herd serve --guard` runs it.

The trigger is taken from the served model's own greedy reply, past the first checks of the stream, so a safe
prefix is released and the stream is cut with content_filter at the first check that sees the trigger."""

from __future__ import annotations

import httpx
import pytest

from llamaherd.guard import LlamaGuard
from llamaherd.guard.batched import BatchedLlamaGuard
from llamaherd.guard.prompt import encode, release
from llamaherd.guard.shield import Shields
from llamaherd.server.moderations import install
from llamaherd.tokenizer import Tokenizer

from . import server_fixtures
from .guard_fixtures import trigger_guard

EVERY = 8
MAX_TOKENS = 40
ASK = [{"role": "user", "content": "Tell me a story about the sea."}]
LG = release("llama-guard-3-8b")


def _client(live, **headers):
    import openai

    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, default_headers=headers)


def _stream(client, max_tokens=MAX_TOKENS, **kw):
    """(per-token text pieces, finish_reason) of a streamed greedy reply (logprobs: one chunk per token)."""
    pieces, finish = [], None
    for chunk in client.chat.completions.create(model="tiny-llama3", messages=ASK, stream=True, temperature=0,
                                                max_tokens=max_tokens, logprobs=True,
                                                extra_body={"ignore_eos": True}, **kw):
        for ch in chunk.choices:
            if ch.delta.content is not None and (ch.delta.content or ch.logprobs):
                pieces.append(ch.delta.content)
            finish = ch.finish_reason or finish
    return pieces, finish


@pytest.fixture(scope="module")
def plan():
    """The plain server's greedy reply, a trigger token first seen past a few checks, and the expected cut."""
    live, _ = server_fixtures.start()
    try:
        pieces, finish = _stream(_client(live))
    finally:
        live.stop()
    assert finish == "length" and len(pieces) == MAX_TOKENS
    tok = Tokenizer.llama3()

    def seen(k: int) -> set[int]:  # the guard prompt's tokens when the first k reply tokens are checked
        reply = "".join(pieces[:k])
        return set(encode(tok, LG, [*ASK, {"role": "assistant", "content": reply}]))

    base = set(encode(tok, LG, ASK)) | seen(0)
    checks = list(range(EVERY, MAX_TOKENS + 1, EVERY))
    for cut_at in checks[2:]:  # released: at least two passing checks first
        before = base | set().union(*(seen(k) for k in checks if k < cut_at))
        fresh = sorted(seen(cut_at) - before)
        if fresh:
            return {"pieces": pieces, "trigger": fresh[0], "cut_at": cut_at,
                    "trigger_text": tok.decode([fresh[0]])}
    pytest.fail("the served model's reply has no token to use as a trigger")


def _serve(trigger: int, **policy):
    """A live server whose shields run the trigger guard on its own batching engine, as `herd serve --guard`."""
    live, _ = server_fixtures.start()
    guard = BatchedLlamaGuard(LlamaGuard(trigger_guard(trigger), "llama-guard-3-8b"), max_batch=4)
    shields = Shields(guard=guard, stream_every=EVERY, **policy)
    install(live.server.config.app, shields, "trigger-guard")
    stop = live.stop

    def stop_both() -> None:
        stop()
        guard.close()

    live.stop = stop_both
    return live, shields


def test_streamed_reply_is_cut_when_it_turns_unsafe(plan):
    live, shields = _serve(plan["trigger"])
    try:
        pieces, finish = _stream(_client(live))
    finally:
        live.stop()
    assert finish == "content_filter"
    assert "".join(pieces) == "".join(plan["pieces"][:plan["cut_at"] - EVERY])  # the checked prefix, no more
    assert shields.metrics()["output"]["unsafe"] == 1 and shields.metrics()["output"]["S1"] == 1


def test_plain_reply_filtered_and_safe_reply_unchanged(plan):
    live, _ = _serve(plan["trigger"])
    try:
        client = _client(live)
        full = client.chat.completions.create(model="tiny-llama3", messages=ASK, temperature=0,
                                              max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True})
        assert full.choices[0].finish_reason == "content_filter" and full.choices[0].message.content == ""
        short = client.chat.completions.create(model="tiny-llama3", messages=ASK, temperature=0, max_tokens=EVERY,
                                               extra_body={"ignore_eos": True})
        assert short.choices[0].finish_reason == "length"
        assert short.choices[0].message.content == "".join(plan["pieces"][:EVERY])
        # Streamed, a reply that stops before the trigger passes every check and arrives token for token.
        safe_len = plan["cut_at"] - EVERY  # the last passing check's text (no trigger in its guard prompt)
        pieces, finish = _stream(client, max_tokens=safe_len)
        assert finish == "length" and pieces == plan["pieces"][:safe_len]
    finally:
        live.stop()


def test_unsafe_input_is_refused(plan):
    bad = [{"role": "user", "content": f"Tell me about {plan['trigger_text']} please"}]
    live, shields = _serve(plan["trigger"])
    try:
        client = _client(live)
        r = client.chat.completions.create(model="tiny-llama3", messages=bad, max_tokens=5)
        assert r.choices[0].finish_reason == "content_filter" and r.choices[0].message.content == ""
        chunks = list(client.chat.completions.create(model="tiny-llama3", messages=bad, max_tokens=5, stream=True))
        assert [c.choices[0].finish_reason for c in chunks] == [None, "content_filter"]
        metrics = httpx.get(f"{live.url}/guard/metrics").text
        assert 'llamaherd_guard_verdicts_total{check="input",status="unsafe"} 2' in metrics
        assert 'llamaherd_guard_verdicts_total{check="input",category="S1"} 2' in metrics
    finally:
        live.stop()
    import openai

    live, _ = _serve(plan["trigger"], on_input="error")
    try:
        with pytest.raises(openai.BadRequestError) as err:
            _client(live).chat.completions.create(model="tiny-llama3", messages=bad, max_tokens=5)
        assert err.value.code == "content_filter" and "S1 Violent Crimes." in err.value.message
    finally:
        live.stop()


def test_opt_out_needs_permission(plan):
    import openai

    bad = [{"role": "user", "content": f"Tell me about {plan['trigger_text']} please"}]
    live, _ = _serve(plan["trigger"])
    try:
        with pytest.raises(openai.PermissionDeniedError):
            _client(live, **{"X-Guard": "off"}).chat.completions.create(model="tiny-llama3", messages=bad,
                                                                       max_tokens=5)
    finally:
        live.stop()
    live, _ = _serve(plan["trigger"], allow_opt_out=True)
    try:
        r = _client(live, **{"X-Guard": "off"}).chat.completions.create(model="tiny-llama3", messages=bad,
                                                                       max_tokens=5, extra_body={"ignore_eos": True})
        assert r.choices[0].finish_reason == "length"
    finally:
        live.stop()
