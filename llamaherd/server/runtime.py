"""The served model: the continuous-batching engine on its own thread, bridged to asyncio request handlers."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import torch

from ..engine.sampling import SamplingParams, resolve_stop_ids
from ..engine.scheduler import Engine, GenerationError
from ..engine.text import Piece, TextStream, Token
from ..memory import kv_bytes_per_token
from .metrics import Metrics


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None


def kv_blocks_for(config, dtype: torch.dtype, budget_bytes: int, block_size: int) -> int:
    """How many cache blocks fit `budget_bytes` of key/value storage."""
    return max(1, budget_bytes // (kv_bytes_per_token(config, dtype) * block_size))


class ServedModel:
    """One loaded model behind the server: owns the engine thread; `stream` is what handlers call."""

    def __init__(self, model, name: str, *, kv_cache_bytes: int = 1 << 30, block_size: int = 16,
                 max_batch: int = 16, prefill_chunk: int = 256, max_waiting: int = 64,
                 max_context: int | None = None, speculative: str | None = None, draft=None,
                 num_speculative_tokens: int = 5) -> None:
        """`speculative="ngram"` or `draft` (a smaller `Model` with this tokenizer) turns on speculative decoding
        for every request that does not turn it off (`stream(..., speculate=False)`)."""
        from ..engine.speculative import proposer_factory
        from ..vision_inputs import placeholder_ids

        self.model, self.name = model, name
        self.tokenizer = model.tokenizer
        dtype = next(model.net.parameters()).dtype
        dtype = dtype if dtype.is_floating_point else torch.float32
        # the network's own config: a tensor-parallel rank's holds its share of the heads (parallel/tp.py)
        blocks = kv_blocks_for(model.net.config, dtype, kv_cache_bytes, block_size)
        self.engine = Engine(model.net, model.net.config, num_blocks=blocks, block_size=block_size, max_batch=max_batch,
                             prefill_chunk=prefill_chunk, max_waiting=max_waiting, max_context=max_context,
                             proposer_factory=proposer_factory(speculative, draft.net if draft else None,
                                                               model.config.vocab_size,
                                                               placeholder_ids(self.tokenizer)),
                             num_speculative_tokens=num_speculative_tokens)
        self.metrics = Metrics()
        self.created = int(time.time())
        self._thread: threading.Thread | None = None

    @property
    def context_length(self) -> int:
        return self.engine.max_context

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self.engine.run, name="herd-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Finish in-flight requests (up to `timeout`), then stop the engine thread."""
        self.engine.stop()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # -- generation --------------------------------------------------------------------------------------------
    def stop_ids(self, params: SamplingParams) -> frozenset[int]:
        return resolve_stop_ids(params, self.tokenizer, self.model.generation_defaults)

    @property
    def stop_ids_default(self) -> frozenset[int]:
        return self.stop_ids(SamplingParams())

    async def stream(self, prompt: Sequence[int], params: SamplingParams, usage: Usage | None = None,
                     stop_ids: frozenset[int] | None = None, constraint=None,
                     speculate: bool = True, images=None) -> AsyncIterator[Piece]:
        """Submit a prompt; yield text pieces as tokens arrive. Closing the iterator cancels the request.
        `speculate=False` turns the server's speculative decoding off for this request. `images`: the prompt's
        images as `prepare_images` makes them (vision models)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Token] = asyncio.Queue()
        usage = usage or Usage()
        usage.prompt_tokens = len(prompt)
        stops = self.stop_ids(params) if stop_ids is None else stop_ids
        text = TextStream(self.tokenizer, params.stop, prompt_tail=prompt)
        seq_id = self.engine.submit(prompt, params, stops, lambda e: loop.call_soon_threadsafe(queue.put_nowait, e),
                                    constraint=constraint, speculate=speculate, images=images)
        self.metrics.request_started(len(prompt))
        engine_done = False
        last_token_time = None
        try:
            while True:
                token = await queue.get()
                engine_done = token.finish_reason is not None
                if token.finish_reason == "error":
                    raise GenerationError(token.error or "generation failed")
                if token.id is not None:  # the end token too: counted, never shown
                    usage.completion_tokens += 1
                if token.id is not None and not token.stop_token:
                    now = time.perf_counter()
                    if usage.first_token is None:
                        usage.first_token = now
                        self.metrics.ttft.observe(now - usage.started)
                    elif last_token_time is not None:
                        self.metrics.itl.observe(now - last_token_time)
                    last_token_time = now
                piece = text.feed(token)
                yield piece
                if piece.finish_reason:  # the engine's end, or a stop string before it (the finally cancels)
                    return
        finally:
            if not engine_done:  # a stop string, or the consumer went away: free the engine's blocks now
                self.engine.cancel(seq_id)
            self.metrics.request_finished(usage.completion_tokens)

    async def prepare_images(self, prompt: Sequence[int], images: Sequence) -> object:
        """A request's images read, checked and tiled for this model (`vision_inputs.PreparedImages`) off the
        event loop; a bad image, a count that does not match the prompt's image tokens, or a text-only model
        raise ImageError (a 400). The encoder runs later, on the engine thread, at the sequence's prefill."""
        from ..vision_inputs import prepare_images

        return await asyncio.to_thread(prepare_images, self.model.net, self.tokenizer, list(prompt), list(images))

    def check(self, prompt: Sequence[int], params: SamplingParams, n: int = 1, images=None) -> None:
        """Raise now what `stream` would raise at submission (too long, images too large for the KV cache, queue
        full, bad logit_bias), so a streaming handler can answer with an error status before its 200 is sent."""
        self.engine.check(prompt, params, n, images)

    async def complete(self, prompt: Sequence[int], params: SamplingParams, usage: Usage | None = None,
                       constraint=None, speculate: bool = True, images=None) -> tuple[str, list[Piece], str]:
        """Run to the end: (text, pieces, finish_reason)."""
        pieces = [p async for p in self.stream(prompt, params, usage, constraint=constraint, speculate=speculate,
                                               images=images)]
        return "".join(p.text for p in pieces), pieces, (pieces[-1].finish_reason if pieces else "stop")


async def interleave(streams: Sequence[AsyncIterator[Piece]]) -> AsyncIterator[tuple[int, Piece]]:
    """Pieces of several streams in arrival order, tagged with their stream's index (OpenAI interleaves the
    choices of an n > 1 stream). All streams run at once, so they share engine steps; closing this iterator
    (a client disconnect) closes every stream, which cancels their requests."""
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i: int, stream: AsyncIterator[Piece]) -> None:
        try:
            async for piece in stream:
                queue.put_nowait((i, piece))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, re-raised there
            queue.put_nowait((i, exc))
        finally:
            queue.put_nowait((i, end))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(tasks)
        while open_streams:
            i, item = await queue.get()
            if item is end:
                open_streams -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
