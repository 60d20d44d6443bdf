"""Llama Guard through the continuous-batching engine (guard/batched.py): the same verdicts and first-token scores
as the one-at-a-time reference (`LlamaGuard.answer`, prefill + cached greedy steps), and concurrent checks
decoded together in shared forward passes. Guards are tiny random models with weight-edited answers
(tests/guard_fixtures.py); nothing is mocked."""

from __future__ import annotations

import threading

import pytest

from llamaherd.guard import LlamaGuard
from llamaherd.guard.batched import BatchedLlamaGuard
from llamaherd.guard.shield import Shields
from llamaherd.tokenizer import Tokenizer

from .guard_fixtures import forced_guard, trigger_guard

ASK = [{"role": "user", "content": "How do I bake bread?"}]
REPLY = [*ASK, {"role": "assistant", "content": "Mix flour, water, salt and yeast; knead; proof; bake."}]


@pytest.mark.parametrize("answer, split", [("unsafe\nS1,S7", 0.5), ("safe", -1.5), ("unsafe", 3.0)])
def test_same_verdict_and_score_as_the_reference(answer, split):
    model = forced_guard(answer, split=split)
    reference = LlamaGuard(model, "llama-guard-3-8b")
    batched = BatchedLlamaGuard(reference, max_batch=4)
    try:
        for convo in (ASK, REPLY):
            want, got = reference.moderate(convo), batched.moderate(convo)
            assert (got.status, got.categories, got.raw) == (want.status, want.categories, want.raw)
            assert got.score == pytest.approx(want.score, abs=1e-5) and 0.0 < got.score < 1.0
            assert batched.moderate(convo, threshold=want.score + 0.01).flagged is False
    finally:
        batched.close()


def test_concurrent_checks_are_batched_and_each_gets_its_own_verdict():
    tok = Tokenizer.llama3()
    trigger = tok.encode(" volcano")[0]
    reference = LlamaGuard(trigger_guard(trigger), "llama-guard-3-8b")
    batched = BatchedLlamaGuard(reference, max_batch=8)
    convos = [[{"role": "user", "content": f"Tell me about the {word} number {i}"}]
              for i, word in enumerate(["volcano", "garden", "river", "volcano", "forest", "volcano", "city", "sea"])]
    want = [reference.moderate(c) for c in convos]
    assert [v.status for v in want] == ["unsafe", "safe", "safe", "unsafe", "safe", "unsafe", "safe", "safe"]
    shields = Shields(guard=batched)
    got: list = [None] * len(convos)
    start = threading.Barrier(len(convos))

    def check(i: int) -> None:
        start.wait()
        got[i] = shields.check_input(convos[i])

    threads = [threading.Thread(target=check, args=(i,)) for i in range(len(convos))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        batched.close()
    assert [r.verdict.status for r in got] == [v.status for v in want]
    assert [r.verdict.categories for r in got] == [v.categories for v in want]
    assert [r.allowed for r in got] == [v.status == "safe" for v in want]
    assert batched.engine.stats["peak_decode_batch"] > 1  # answers were decoded together, not one by one
    assert shields.metrics()["input"] == {"S1": 3, "safe": 5, "unsafe": 3}
