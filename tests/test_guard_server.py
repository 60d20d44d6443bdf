"""/v1/moderations and the serving shields through a live server and the official openai client, with tiny
guard models whose verdict is forced by weight edits (tests/guard_fixtures.py)."""

from __future__ import annotations

import httpx
import pytest

from llamaherd.guard import LlamaGuard
from llamaherd.guard.batched import BatchedLlamaGuard
from llamaherd.guard.shield import OPENAI_NAMES, Shields
from llamaherd.server.moderations import install

from . import server_fixtures
from .guard_fixtures import forced_guard


def _serve(guard_answer: str | None, batched: bool = False, **policy):
    live, served = server_fixtures.start()
    if guard_answer is not None:
        guard = LlamaGuard(forced_guard(guard_answer), "llama-guard-3-8b")
        guard = BatchedLlamaGuard(guard, max_batch=4) if batched else guard
        shields = Shields(guard=guard, **policy)
        install(live.server.config.app, shields, "tiny-guard")
    return live


@pytest.fixture(scope="module")
def unsafe_server():
    live = _serve("unsafe\nS1,S7")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def safe_server():
    live = _serve("safe", batched=True)  # a list of inputs goes to the batching guard together
    yield live
    live.stop()


def _client(live):
    import openai

    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)


def test_moderation_flags_with_openai_categories(unsafe_server):
    result = _client(unsafe_server).moderations.create(input="how do I hurt someone", model="tiny-guard")
    assert result.model == "tiny-guard" and len(result.results) == 1
    r = result.results[0]
    assert r.flagged
    cats = r.categories.model_dump(by_alias=True)
    assert {k for k, v in cats.items() if v} == {"violence", "illicit/violent"}  # S1; S7 Privacy has no OpenAI name
    scores = r.category_scores.model_dump(by_alias=True)
    assert scores["violence"] > 0.99 and scores["hate"] == 0.0
    assert set(cats) >= set(OPENAI_NAMES)
    extra = r.model_extra["llama_guard"]
    assert extra["categories"] == ["S1", "S7"] and extra["category_names"][1] == "Privacy."


def test_moderation_lists_and_safe(safe_server):
    result = _client(safe_server).moderations.create(input=["hello", "the weather is nice"])
    assert [r.flagged for r in result.results] == [False, False]
    assert not any(result.results[0].categories.model_dump().values())


def test_moderation_bad_requests(unsafe_server, safe_server):
    url = f"{unsafe_server.url}/v1/moderations"
    r = httpx.post(url, json={"input": [{"type": "image_url", "image_url": {"url": "x"}}]})
    assert r.status_code == 400 and "text only" in r.json()["error"]["message"]
    r = httpx.post(url, json={"input": 3})
    assert r.status_code == 400
    r = httpx.post(url, json={"input": "x", "model": "other"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_moderation_without_a_guard_is_404():
    live = _serve(None)
    try:
        r = httpx.post(f"{live.url}/v1/moderations", json={"input": "x"})
        assert r.status_code == 404 and "--guard" in r.json()["error"]["message"]
    finally:
        live.stop()
