"""The served model: the continuous-batching engine on its own thread, bridged to asyncio request handlers."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import torch

from ..engine.sampling import Sampler, SamplingParams, resolve_stop_ids
from ..engine.scheduler import Engine, Event, GenerationError, QueueFull
from ..engine.text import TextStream
from ..errors import ContextLengthError
from .metrics import Metrics


@dataclass
class Chunk:
    """One step of a generation as a handler sees it: new text (maybe empty) and the token behind it."""

    text: str
    token: int | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None


def kv_blocks_for(config, dtype: torch.dtype, budget_bytes: int, block_size: int) -> int:
    """How many cache blocks fit `budget_bytes` of key/value storage."""
    per_token = 2 * config.n_layers * config.n_kv_heads * config.head_dim * torch.finfo(dtype).bits // 8
    return max(1, budget_bytes // (per_token * block_size))


class ServedModel:
    """One loaded model behind the server: owns the engine thread; `stream` is what handlers call."""

    def __init__(self, model, name: str, *, kv_cache_bytes: int = 1 << 30, block_size: int = 16,
                 max_batch: int = 16, prefill_chunk: int = 256, max_waiting: int = 64,
                 max_context: int | None = None) -> None:
        self.model, self.name = model, name
        self.tokenizer = model.tokenizer
        dtype = next(model.net.parameters()).dtype
        dtype = dtype if dtype.is_floating_point else torch.float32
        blocks = kv_blocks_for(model.config, dtype, kv_cache_bytes, block_size)
        self.engine = Engine(model.net, model.config, num_blocks=blocks, block_size=block_size, max_batch=max_batch,
                             prefill_chunk=prefill_chunk, max_waiting=max_waiting, max_context=max_context)
        self.metrics = Metrics()
        self.created = int(time.time())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def context_length(self) -> int:
        return self.engine.max_context

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self.engine.run, args=(self._stop,), name="herd-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Finish in-flight requests (up to `timeout`), then stop the engine thread."""
        self._stop.set()
        with self.engine._wake:
            self.engine._wake.notify_all()
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
                     stop_ids: frozenset[int] | None = None, constraint=None) -> AsyncIterator[Chunk]:
        """Submit a prompt; yield text chunks as tokens arrive. Closing the iterator cancels the request."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        usage = usage or Usage()
        usage.prompt_tokens = len(prompt)
        stops = self.stop_ids(params) if stop_ids is None else stop_ids
        text = TextStream(self.tokenizer, params.stop, prompt_tail=prompt)
        seq_id = self.engine.submit(prompt, params, stops, lambda e: loop.call_soon_threadsafe(queue.put_nowait, e),
                                    constraint=constraint)
        self.metrics.request_started(len(prompt))
        finish = "cancelled"
        last_token_time = None
        try:
            while True:
                event = await queue.get()
                now = time.perf_counter()
                if event.token is not None and not event.stop_token:
                    usage.completion_tokens += 1
                    if usage.first_token is None:
                        usage.first_token = now
                        self.metrics.ttft.observe(now - usage.started)
                    elif last_token_time is not None:
                        self.metrics.itl.observe(now - last_token_time)
                    last_token_time = now
                    piece = text.push(event.token)
                    if text.stopped:  # a stop string appeared: end here, free the engine's blocks
                        self.engine.cancel(seq_id)
                        finish = "stop"
                        yield Chunk(piece, event.token, event.logprob, event.top_logprobs, "stop")
                        return
                    if event.finish_reason:
                        piece += text.flush()
                    yield Chunk(piece, event.token, event.logprob, event.top_logprobs, event.finish_reason)
                elif event.token is not None:  # the stop token itself: counted, never shown
                    usage.completion_tokens += 1
                    yield Chunk(text.flush(), None, finish_reason="stop")
                elif event.finish_reason == "error":
                    finish = "error"
                    raise GenerationError(event.error or "generation failed")
                else:
                    yield Chunk(text.flush(), None, finish_reason=event.finish_reason)
                if event.finish_reason:
                    finish = event.finish_reason
                    return
        finally:
            if finish == "cancelled":
                self.engine.cancel(seq_id)
            self.metrics.request_finished(usage.completion_tokens)

    def check(self, prompt: Sequence[int], params: SamplingParams, n: int = 1) -> None:
        """Raise now what `stream` would raise at submission (too long, queue full, bad logit_bias), so a
        streaming handler can answer with an error status before it sends its 200 and first event."""
        if len(prompt) >= self.engine.max_context:
            raise ContextLengthError(f"the prompt has {len(prompt)} tokens; this server's context holds "
                                     f"{self.engine.max_context}: shorten it")
        if self.engine.num_waiting + n > self.engine.max_waiting:
            raise QueueFull(f"{self.engine.num_waiting} requests are already waiting; retry later")
        Sampler(params, self.model.config.vocab_size)  # validates logit_bias against the vocabulary

    async def complete(self, prompt: Sequence[int], params: SamplingParams, usage: Usage | None = None,
                       constraint=None) -> tuple[str, list[Chunk], str]:
        """Run to the end: (text, chunks, finish_reason)."""
        chunks = [c async for c in self.stream(prompt, params, usage, constraint=constraint)]
        return "".join(c.text for c in chunks), chunks, (chunks[-1].finish_reason if chunks else "stop")


async def interleave(streams: Sequence[AsyncIterator[Chunk]]) -> AsyncIterator[tuple[int, Chunk]]:
    """Chunks of several streams in arrival order, tagged with their stream's index (OpenAI interleaves the
    choices of an n > 1 stream). All streams run at once, so they share engine steps; closing this iterator
    (a client disconnect) closes every stream, which cancels their requests."""
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i: int, stream: AsyncIterator[Chunk]) -> None:
        try:
            async for chunk in stream:
                queue.put_nowait((i, chunk))
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
