"""Speculation inside continuous batching: several sequences, some speculating and some not, give exactly the
tokens of plain decoding; rejected and padded slots roll back (prefix reuse and preemption keep outputs; every
block comes back)."""

from llamaherd.engine.sampling import SamplingParams
from llamaherd.engine.scheduler import Engine
from llamaherd.engine.speculative import DraftProposer, NgramProposer

from .conftest import TINY, random_model
from .test_engine_batching import prompts, reference_greedy

CONFIG = TINY["llama3"]
N = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=N)


def _repetitive(n, seed):
    """Prompts that repeat their own pieces, so prompt lookup proposes (and some proposals are kept)."""
    return [p[:6] * 3 + p[6:9] for p in prompts(n, seed) if len(p) >= 9] or [list(range(20)) * 2]


def _run(engine, ps, speculate):
    outs = [[] for _ in ps]
    for p, out, spec in zip(ps, outs, speculate):
        engine.submit(p, GREEDY, frozenset(), out.append, speculate=spec)
    while engine.step():
        pass
    return [[t.id for t in out if t.id is not None] for out in outs]


def test_ngram_in_the_batch_equals_plain():
    net = random_model(CONFIG)
    ps = _repetitive(8, seed=3)
    engine = Engine(net, CONFIG, num_blocks=128, block_size=4, proposer_factory=NgramProposer, num_speculative_tokens=4)
    outs = _run(engine, ps, [i % 3 != 0 for i in range(len(ps))])  # the per-request off switch: every third
    for p, out in zip(ps, outs):
        assert out == reference_greedy(net, p, N)
    assert engine.stats["spec_proposed"] > 0 and engine.stats["peak_decode_batch"] > 1
    assert engine.cache.num_free == 128


def test_draft_in_the_batch_with_prefix_reuse_and_preemption():
    net = random_model(CONFIG)
    draft = random_model(CONFIG, seed=5)
    ps = _repetitive(6, seed=4)
    # Few blocks: sequences are preempted and recomputed; the second round reuses cached prompt prefixes.
    engine = Engine(net, CONFIG, num_blocks=40, block_size=4, prefill_chunk=8,
                    proposer_factory=lambda: DraftProposer(draft), num_speculative_tokens=3)
    first = _run(engine, ps, [True] * len(ps))
    again = _run(engine, ps, [True] * len(ps))
    for p, a, b in zip(ps, first, again):
        assert a == b == reference_greedy(net, p, N)
    assert engine.stats["prefix_hit_tokens"] > 0
    assert engine.cache.num_free == 40


def test_self_draft_keeps_everything():
    net = random_model(CONFIG)
    ps = _repetitive(3, seed=6)
    engine = Engine(net, CONFIG, num_blocks=64, block_size=4, proposer_factory=lambda: DraftProposer(net),
                    num_speculative_tokens=4)
    outs = _run(engine, ps, [True] * len(ps))
    assert outs == [reference_greedy(net, p, N) for p in ps]
    assert engine.stats["spec_accepted"] == engine.stats["spec_proposed"] > 0
    assert engine.stats["generated_tokens"] == N * len(ps)
