"""Llama Guard on the continuous-batching engine: each check is one request, so concurrent checks share forwards.

`LlamaGuard.answer` runs one conversation at a time (prefill, then one step per token). A server checks many:
every request's input, every streamed reply every N tokens, every /v1/moderations input. `BatchedLlamaGuard`
submits each check to an `engine.scheduler.Engine` over the guard model, on its own thread, so checks arriving
together are prefilled and decoded in the same forward passes, admitted and retired independently (the same
engine that serves generation). Prompt, verdict and parsing are `LlamaGuard`'s; only `answer` differs.

The first-token score comes from the engine's log-probabilities: the greedy pick's own, or its 20 most likely
alternatives (the engine's top_logprobs limit). When `unsafe` is not among them its probability is below the
20th alternative's and is not known exactly: the score is then None and `flagged` follows the generated answer.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

from ..engine.sampling import SamplingParams
from ..engine.scheduler import Engine
from ..engine.text import Token
from ..vision_inputs import prepare_images
from .llama_guard import MAX_ANSWER_TOKENS, LlamaGuard
from .prompt import GuardError

TOP_LOGPROBS = 20  # the most the engine reports (SamplingParams.top_logprobs)


class BatchedLlamaGuard(LlamaGuard):
    """A `LlamaGuard` whose answers come from a continuous-batching engine; `moderate` is safe to call from
    many threads at once (each call blocks until its own answer is complete)."""

    concurrent = True  # shields need no lock around it

    def __init__(self, guard: LlamaGuard, *, max_batch: int = 16, block_size: int = 16,
                 context_tokens: int = 8192, timeout: float = 600.0) -> None:
        """`context_tokens`: the KV cache, in tokens, shared by the checks in flight (a Llama Guard 3 prompt is
        ~250 tokens plus the conversation; 8192 tokens of Llama Guard 3 8B in bfloat16 are 1 GiB); a check waits
        for room when it is full, and one longer than this is refused."""
        super().__init__(guard.model, guard.release, categories=guard.categories, excluded=guard.excluded,
                         threshold=guard.threshold)
        model = guard.model
        self.engine = Engine(model.net, model.config, num_blocks=max(1, context_tokens // block_size),
                             block_size=block_size, max_batch=max_batch,
                             max_context=min(model.context_limit(), context_tokens))
        self.timeout = timeout
        self.params = SamplingParams(max_tokens=MAX_ANSWER_TOKENS, temperature=0.0, logprobs=True,
                                     top_logprobs=TOP_LOGPROBS)
        self._thread = threading.Thread(target=self.engine.run, name="herd-guard-engine", daemon=True)
        self._thread.start()

    def answer(self, ids: Sequence[int], images: Sequence = ()) -> tuple[str, float | None]:
        """Greedy answer text and P(first word = 'unsafe'), from the engine (see the module docstring). `images`
        are read and tiled here and encoded by the engine at the check's prefill, as the server's requests."""
        prepared = prepare_images(self.model.net, self.model.tokenizer, list(ids), list(images)) if images else None
        tokens: list[Token] = []
        done = threading.Event()

        def sink(token: Token) -> None:  # engine thread
            tokens.append(token)
            if token.finish_reason is not None:
                done.set()

        seq = self.engine.submit(list(ids), self.params, self.stop_ids, sink, images=prepared)
        if not done.wait(self.timeout):
            self.engine.cancel(seq)
            raise GuardError(f"the guard model gave no answer within {self.timeout:.0f} s")
        if tokens[-1].finish_reason == "error":
            raise GuardError(f"the guard model failed: {tokens[-1].error}")
        out = [t.id for t in tokens if t.id is not None and not t.stop_token]
        return self.model.tokenizer.decode(out), self._score(tokens)

    def _score(self, tokens: list[Token]) -> float | None:
        """P(unsafe) at the first step whose pick is a stop or not whitespace (as `greedy_answer` reads it)."""
        decode = self.model.tokenizer.decode
        for t in tokens:
            if t.id is None:
                continue
            if t.stop_token or decode([t.id]).strip():
                if t.id == self.unsafe_id:
                    return math.exp(t.logprob)
                alternatives = dict(t.top_logprobs or ())
                return math.exp(alternatives[self.unsafe_id]) if self.unsafe_id in alternatives else None
        return None

    def close(self, timeout: float = 30.0) -> None:
        """Finish the checks in flight, then stop the engine thread."""
        self.engine.stop()
        self._thread.join(timeout)
