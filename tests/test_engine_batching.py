"""The continuous-batching engine: batched equals alone, prefix caching, preemption, chunked prefill, aborts."""

import torch

from llamaherd.engine.sampling import SamplingParams
from llamaherd.engine.scheduler import Engine

from .conftest import TINY, random_model

CONFIG = TINY["llama3"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


def reference_greedy(net, prompt, n):
    """Argmax path of full-sequence forwards: no cache at all."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(net(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def run_all(engine, prompts, params=GREEDY):
    outputs = [[] for _ in prompts]
    for p, out in zip(prompts, outputs):
        engine.submit(p, params, frozenset(), out.append)
    while engine.step():
        pass
    return [[t.id for t in out if t.id is not None] for out in outputs]


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CONFIG.vocab_size, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_batched_equals_alone_equals_reference():
    net = random_model(CONFIG)
    ps = prompts(6)
    together = run_all(Engine(net, CONFIG, num_blocks=64, block_size=8), ps)
    for p, out in zip(ps, together):
        alone = run_all(Engine(net, CONFIG, num_blocks=64, block_size=8), [p])[0]
        assert out == alone == reference_greedy(net, p, 12)


def test_chunked_prefill_and_preemption_keep_outputs():
    net = random_model(CONFIG)
    ps = prompts(5, seed=1)
    # 12 blocks of 4 tokens cannot hold five sequences of up to 52 tokens: preemption must happen.
    engine = Engine(net, CONFIG, num_blocks=16, block_size=4, prefill_chunk=5)
    outs = run_all(engine, ps)
    assert engine.stats["preemptions"] > 0
    for p, out in zip(ps, outs):
        assert out == reference_greedy(net, p, 12)
    assert engine.cache.num_free == 16


def test_prefix_cache_reuses_blocks_and_keeps_outputs():
    net = random_model(CONFIG)
    shared = prompts(1, seed=2)[0] * 2  # long shared prefix
    a, b = shared + [1, 2, 3], shared + [4, 5]
    engine = Engine(net, CONFIG, num_blocks=64, block_size=4)
    out_a = run_all(engine, [a])[0]
    out_b = run_all(engine, [b])[0]
    assert engine.stats["prefix_hit_tokens"] >= (len(shared) // 4) * 4 - 4
    assert out_a == reference_greedy(net, a, 12) and out_b == reference_greedy(net, b, 12)


def test_cancelled_streams_return_every_block():
    net = random_model(CONFIG)
    engine = Engine(net, CONFIG, num_blocks=256, block_size=4, max_batch=64)
    free_before = engine.cache.num_free
    events = {}
    ids = [engine.submit(p, SamplingParams(temperature=1.0, seed=i, max_tokens=50), frozenset(),
                         events.setdefault(i, []).append) for i, p in enumerate(prompts(50, 3))]
    for _ in range(6):
        engine.step()
    for sid in ids:
        engine.cancel(sid)
    while engine.step():
        pass
    assert engine.num_running == engine.num_waiting == 0
    assert engine.cache.num_free == free_before
    assert all(events[i][-1].finish_reason in ("cancelled", "length") for i in range(len(ids)))


def test_stop_token_and_max_tokens_end_a_sequence():
    net = random_model(CONFIG)
    p = prompts(1, 4)[0]
    ref = reference_greedy(net, p, 12)
    stop = ref[3]
    engine = Engine(net, CONFIG, num_blocks=32, block_size=8)
    events = []
    engine.submit(p, GREEDY, frozenset({stop}), events.append)
    while engine.step():
        pass
    first = ref.index(stop)
    assert [t.id for t in events] == ref[: first + 1]
    assert events[-1].finish_reason == "stop" and events[-1].stop_token


class FailingOnce(torch.nn.Module):
    """The real model, except that its next forward raises (a fault injected into an engine step)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.armed = net, False

    def forward(self, *args, **kwargs):
        if self.armed:
            self.armed = False
            raise RuntimeError("injected fault")
        return self.net(*args, **kwargs)


def test_failed_step_fails_its_requests_and_the_engine_goes_on():
    import threading

    net = random_model(CONFIG)
    wrapped = FailingOnce(net)
    engine = Engine(wrapped, CONFIG, num_blocks=64, block_size=8)
    thread = threading.Thread(target=engine.run, daemon=True)
    p = prompts(2, 5)
    done = [threading.Event(), threading.Event()]
    events: list[list] = [[], []]

    def sink(k):
        def put(e):
            events[k].append(e)
            if e.finish_reason:
                done[k].set()
        return put

    wrapped.armed = True
    engine.submit(p[0], GREEDY, frozenset(), sink(0))
    thread.start()
    assert done[0].wait(30)
    assert events[0][-1].finish_reason == "error" and "injected fault" in events[0][-1].error
    engine.submit(p[1], GREEDY, frozenset(), sink(1))
    assert done[1].wait(60)
    engine.stop()
    thread.join(10)
    assert not thread.is_alive(), "engine.stop() did not end the loop"
    assert [t.id for t in events[1]] == reference_greedy(net, p[1], 12)
    assert engine.cache.num_free == 64
