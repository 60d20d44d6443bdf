"""The engine under concurrent use: cancels from another thread while the engine thread preempts and admits.

A thread switch inside `cancel` while the engine thread moves a sequence between `waiting` and `running`
is a real race (a deque mutated during iteration raises; a list changed during iteration skips entries).
Thread switches cannot be forced from outside, so the test makes the race as likely as it can: the waiting
queue hands the GIL over between the items of every walk (what a loaded machine does at random), a cache so
small that almost every step preempts a sequence, and another thread cancelling all the while. Against an
engine that preempts without the lock, the canceller's walk raises within the first few preemptions.
"""

import random
import sys
import threading
import time
from collections import deque

from llamaherd.engine.sampling import SamplingParams
from llamaherd.engine.scheduler import Engine

from .conftest import TINY, random_model

CONFIG = TINY["llama3"]


class YieldingDeque(deque):
    """A deque whose walks from one thread (the canceller's) give the GIL away between items, so that the
    engine thread runs in the middle of them; the engine's own walks run at full speed."""

    slow_thread: threading.Thread | None = None

    def __iter__(self):
        if threading.current_thread() is not self.slow_thread:
            yield from super().__iter__()
            return
        for item in super().__iter__():
            yield item
            time.sleep(0)


def test_cancels_racing_preemption_leave_the_engine_consistent():
    net = random_model(CONFIG)
    # 12 blocks of 2 tokens: eight running sequences cannot all grow, so steps keep preempting the newest one.
    engine = Engine(net, CONFIG, num_blocks=12, block_size=2, max_batch=8, prefill_chunk=4, max_waiting=100_000)
    engine.waiting = YieldingDeque()
    finals: dict[int, list[str]] = {}
    lock = threading.Lock()

    def sink_for(k):
        def sink(event):
            if event.finish_reason:
                with lock:
                    finals.setdefault(k, []).append(event.finish_reason)
        return sink

    rng = random.Random(0)
    n = 400
    ids = []
    for k in range(n):
        prompt = [rng.randrange(CONFIG.vocab_size) for _ in range(rng.randrange(2, 6))]
        ids.append(engine.submit(prompt, SamplingParams(temperature=1.0, seed=k), frozenset(), sink_for(k)))
    order = list(range(n))
    rng.shuffle(order)
    failures: list[BaseException] = []
    window = {}

    def canceller():
        try:
            # Until the first preemption, cancel nothing real: only walk the queues (a cancel of an id that is
            # gone does), so the waiting queue stays long. Then cancel the requests one by one, spread over two
            # seconds of preemption, walking the queues as fast as possible in between.
            deadline = time.monotonic() + 60
            while engine.stats["preemptions"] == 0 and time.monotonic() < deadline:
                engine.cancel(-1)
            window["start"], t0 = engine.stats["preemptions"], time.monotonic()
            for i, k in enumerate(order):
                while time.monotonic() < t0 + 2.0 * i / n:
                    engine.cancel(-1)
                    time.sleep(0)  # let the engine thread take the lock: it must keep stepping
                engine.cancel(ids[k])
            window["end"] = engine.stats["preemptions"]
        except BaseException as exc:  # noqa: BLE001 - reported by the test body
            failures.append(exc)

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    runner = threading.Thread(target=engine.run, daemon=True)
    worker = engine.waiting.slow_thread = threading.Thread(target=canceller, daemon=True)
    try:
        runner.start()
        worker.start()
        worker.join(120)
    finally:
        sys.setswitchinterval(old_interval)
    if failures:  # end the rest quickly, so that the failure is reported without a long wait
        for sid in ids:
            for _ in range(100):
                try:
                    engine.cancel(sid)
                    break
                except RuntimeError:
                    pass
    engine.stop()
    runner.join(120)
    assert not worker.is_alive() and not runner.is_alive(), "the engine or the canceller hung"
    assert not failures, f"cancel raised while the engine was preempting: {failures[0]!r}"
    preempted = window.get("end", 0) - window.get("start", 0)
    assert preempted >= 20, f"only {preempted} preemptions while cancelling: the race was hardly exercised"
    assert sorted(finals) == list(range(n)), f"{n - len(finals)} request(s) never got a final event"
    assert all(len(v) == 1 for v in finals.values()), "a request got more than one final event"
    reasons = {v[0] for v in finals.values()}
    assert reasons <= {"cancelled", "length"}, f"unexpected finish reasons: {reasons}"
    assert engine.num_running == engine.num_waiting == 0
    assert engine.cache.num_free == engine.cache.num_blocks
