"""Continuous batching: requests join and leave the running batch between steps, over the paged KV cache.

Each `step` decodes one token for every running sequence whose prompt is in the cache (one batched forward)
and advances at most one prompt by a chunk of `prefill_chunk` tokens (chunked prefill, so a long prompt never
stalls running streams). When blocks run out, the newest sequence is preempted: its blocks are freed and it
is recomputed later from its tokens (vLLM's recompute preemption). Cancelled sequences free their blocks at
the next step. Token-level stops live here; text-level stops (stop strings) belong to the caller's `TextStream`.
Where keys and values live is `paged.KVCacheManager`'s concern; this module decides who runs.

Speculative decoding (engine/speculative.py), when the engine is built with a proposer factory: each decoding
sequence that speculates gets up to k proposed tokens; all decoding rows go through one forward of 1 + K tokens
(K the batch's longest proposal, shorter rows padded), each row's proposals are verified exactly against its own
sampler, and `cached` rolls back to the kept tokens, so the keys of rejected or padded slots are overwritten by
the next step and never registered for prefix reuse (only blocks wholly below `cached` are).

Threads: `submit`, `check`, `cancel` and `stop` come from any thread, `step`/`run` from one engine thread. Every
change of `waiting` and `running` (and every walk over them) happens under one lock; the forward pass does not.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ImageError, LlamaherdError
from .step import check_context
from .paged import KVCacheManager, OutOfBlocks
from .sampling import Sampler, SamplingParams
from .text import Token

log = logging.getLogger("llamaherd.engine")


class QueueFull(LlamaherdError):
    """The engine's waiting queue is at capacity; retry later."""


class GenerationError(LlamaherdError):
    """A request could not be generated (its KV-cache need exceeds the cache, or an engine step failed)."""


@dataclass(eq=False)
class SeqState:
    id: int
    tokens: list[int]  # prompt, then generated tokens
    prompt_len: int
    params: SamplingParams
    sampler: Sampler
    stop_ids: frozenset[int]
    sink: Callable[[Token], None]  # gets every token of this sequence, then its end, on the engine thread
    constraint: object | None = None  # grammar: `mask(logits)` in place, `accept(token)`, `done`
    cached: int = 0  # leading tokens whose keys/values are in the cache
    cancelled: bool = False
    proposer: object | None = None  # speculative decoding for this sequence (None: off)
    tracker: object | None = None  # its running acceptance rate and next k
    images: object | None = None  # vision models: the request's images (vision_inputs.PreparedImages)
    holds_images: bool = False  # its images' cross-attention keys/values are counted in the cache's blocks

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.cached

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]


class Engine:
    """A continuous-batching engine over one model. Thread-safe `submit` / `cancel`; `step` runs on one thread."""

    def __init__(self, net: nn.Module, config: ModelConfig, *, num_blocks: int, block_size: int = 16,
                 max_batch: int = 16, prefill_chunk: int = 256, max_waiting: int = 256,
                 max_context: int | None = None, proposer_factory: Callable[[], object] | None = None,
                 num_speculative_tokens: int = 5) -> None:
        p = next(net.parameters())
        self.net, self.config = net, config
        self.cache = KVCacheManager(config, num_blocks, block_size,
                                    dtype=p.dtype if p.is_floating_point() else torch.float32, device=p.device)
        self.max_batch, self.prefill_chunk, self.max_waiting = max_batch, prefill_chunk, max_waiting
        self.max_context = min(max_context or config.max_seq_len, num_blocks * block_size)
        self.waiting: deque[SeqState] = deque()
        self.running: list[SeqState] = []
        # Re-entrant: a sink called under the lock may call back (cancel, submit) on the engine thread.
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._ids = itertools.count()
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0, "preemptions": 0, "prefix_hit_tokens": 0,
                      "peak_decode_batch": 0,  # most sequences decoded in one forward so far
                      "spec_proposed": 0, "spec_accepted": 0}  # speculative tokens proposed and kept
        # Speculative decoding: a new proposer per sequence (n-gram lookup, or a draft model with its own cache).
        self.proposer_factory, self.num_speculative_tokens = proposer_factory, num_speculative_tokens
        self._spec_k = 0  # proposals this step's decode rows have room for (set by _plan)
        self._images = None  # vision_inputs.BatchImages, made at the first request with images
        self._image_refs: dict[int, int] = {}  # id(PreparedImages) -> running sequences that read them

    # -- submission (any thread) -------------------------------------------------------------------------------
    def check(self, prompt: Sequence[int], params: SamplingParams, n: int = 1, images=None) -> None:
        """Raise now what `submit` would raise for `n` such requests: a prompt that leaves no room in the
        context, images whose keys/values cannot fit the cache, a full waiting queue, sampling parameters this
        vocabulary cannot take (logit_bias)."""
        check_context(len(prompt), self.max_context, "this server's context")
        self._check_image_room(len(prompt), images)
        if len(self.waiting) + n > self.max_waiting:
            raise QueueFull(f"{len(self.waiting)} requests are already waiting; retry later")
        Sampler(params, self.config.vocab_size)

    def image_blocks(self, images) -> int:
        """Cache blocks worth of a request's image keys/values (Llama 3.2 Vision; 0 for none and for Llama 4,
        whose image features become prompt tokens). Each cross-attention layer keeps keys and values for
        `kv_tokens` image tokens, as wide as a self-attention layer's (model/mllama.py `image_kv`), and a block
        holds `block_size` tokens of every self-attention layer, so the ratio needs no dtype."""
        if images is None or not getattr(images, "kv_tokens", 0):
            return 0
        per_block = self.cache.block_size * self.config.n_layers
        return -(-images.kv_tokens * self.config.vision.n_cross_attention_layers // per_block)

    def _check_image_room(self, prompt_len: int, images) -> None:
        need = self.image_blocks(images)
        prompt = -(-prompt_len // self.cache.block_size)
        if need and need + prompt > self.cache.num_blocks:
            raise ImageError(f"the images' cross-attention keys and values need {need} KV-cache blocks and the "
                             f"prompt {prompt}, more than the {self.cache.num_blocks} of this server's KV-cache "
                             "budget; send fewer or smaller images, or start the server with a larger KV cache")

    def submit(self, prompt: Sequence[int], params: SamplingParams, stop_ids: frozenset[int],
               sink: Callable[[Token], None], constraint=None, speculate: bool = True, images=None) -> int:
        """Queue a request; its tokens go to `sink` as they are generated, the last with its finish_reason.
        `speculate=False` turns speculative decoding off for this request (structured output always does).
        `images` (vision models: `vision_inputs.PreparedImages` for this prompt) are encoded at the sequence's
        prefill and stay with it until it finishes; its prefix-cache keys are salted with their digest."""
        check_context(len(prompt), self.max_context, "this server's context")
        self._check_image_room(len(prompt), images)
        sampler = Sampler(params, self.config.vocab_size)
        with self._wake:
            seq_id = next(self._ids)
            if params.max_tokens == 0:
                sink(Token(None, "length"))
                return seq_id
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting; retry later")
            seq = SeqState(seq_id, list(prompt), len(prompt), params, sampler, stop_ids, sink, constraint,
                           images=images)
            if speculate and constraint is None and self.proposer_factory is not None:
                from .speculative import AcceptanceTracker

                seq.proposer, seq.tracker = self.proposer_factory(), AcceptanceTracker(self.num_speculative_tokens)
            self.waiting.append(seq)
            self._wake.notify()
        return seq_id

    def cancel(self, seq_id: int) -> None:
        """End a request at the next step (its sink gets a "cancelled" end); an id no longer known is ignored."""
        with self._lock:
            for seq in itertools.chain(self.waiting, self.running):
                if seq.id == seq_id:
                    seq.cancelled = True

    def stop(self) -> None:
        """Let `run` return once the requests in flight are done (graceful shutdown)."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()

    def wait_for_work(self, timeout: float | None = None) -> bool:
        with self._wake:
            if not (self.waiting or self.running or self._stopping):
                self._wake.wait(timeout)
            return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def cache_usage(self) -> float:
        return self.cache.usage()

    # -- one step (engine thread) ------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> bool:
        """Admit, schedule, run the model, sample, emit tokens. Returns whether anything ran."""
        with self._lock:
            self._drop_cancelled()
            self._admit()
            plan = self._plan()
        if plan is None:
            return False
        decode, prefill, chunk = plan
        if decode:
            self.stats["peak_decode_batch"] = max(self.stats["peak_decode_batch"], len(decode))
            if self._spec_k:
                self._speculative_decode(decode, self._spec_k)
            else:
                logits = self._forward(decode, 1)
                for i, seq in enumerate(decode):
                    self._sample(seq, logits[i : i + 1, -1])
        if prefill is not None and prefill.images is not None and not self._encode_images(prefill):
            prefill = None
        if prefill is not None:
            logits = self._forward([prefill], chunk)
            if prefill.pending == 0:  # the whole prompt is cached: its last logits give the first token
                self._sample(prefill, logits[:, -1])
        return True

    # The four below run under the lock.
    def _drop_cancelled(self) -> None:
        for seq in [s for s in self.running if s.cancelled]:
            self._finish(seq, "cancelled")
        for seq in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(seq)
            seq.sink(Token(None, "cancelled"))

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            if not self._hold_images(seq):  # its images do not fit the cache now: it waits, first in line
                break
            self.waiting.popleft()
            seq.cached = self.cache.take_prefix(seq.id, seq.tokens,
                                                salt=seq.images.digest if seq.images is not None else 0)
            self.stats["prefix_hit_tokens"] += seq.cached
            self.running.append(seq)

    def _plan(self) -> tuple[list[SeqState], SeqState | None, int] | None:
        """Choose this step's work and reserve its blocks, preempting the newest sequences if they run out."""
        while self.running:
            decode = [s for s in self.running if s.pending == 1]
            prefill = next((s for s in self.running if s.pending > 1), None)
            chunk = min(prefill.pending, self.prefill_chunk) if prefill else 0
            # Speculating rows propose up to k tokens; every decode row is padded to that width, so each
            # reserves the slots (and none may pass the context).
            k = max((s.tracker.next_k(s.proposer.cost) for s in decode if s.proposer is not None), default=0)
            self._spec_k = max(0, min([k] + [self.max_context - len(s.tokens) - 1 for s in decode]))
            try:
                for seq in decode:
                    self.cache.reserve(seq.id, seq.cached + 1 + self._spec_k)
                if prefill is not None:
                    self.cache.reserve(prefill.id, prefill.cached + chunk)
                return decode, prefill, chunk
            except OutOfBlocks:
                if len(self.running) == 1:
                    self._finish(self.running[0], "error", "the KV cache is too small for this request")
                    continue
                self._preempt(self.running[-1])
        return None

    def _hold_images(self, seq: SeqState) -> bool:
        """Count the sequence's image keys/values in the cache's blocks (once for the sequences of one request,
        which read the same encoded images); False when the blocks are not free."""
        if seq.images is None or seq.holds_images:
            return True
        key = id(seq.images)
        if key not in self._image_refs and not self.cache.hold(key, self.image_blocks(seq.images)):
            return False
        self._image_refs[key] = self._image_refs.get(key, 0) + 1
        seq.holds_images = True
        return True

    def _drop_images(self, seq: SeqState) -> None:
        if not seq.holds_images:
            return
        seq.holds_images = False
        key = id(seq.images)
        self._image_refs[key] -= 1
        if not self._image_refs[key]:
            del self._image_refs[key]
            self.cache.release_held(key)

    def _preempt(self, seq: SeqState) -> None:
        self._drop_images(seq)
        self.cache.release(seq.id)
        seq.cached = 0
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.stats["preemptions"] += 1

    def _finish(self, seq: SeqState, reason: str | None, error: str | None = None) -> None:
        """Free a sequence's blocks and drop it; `reason` given means the sink still needs its end."""
        with self._lock:
            self._drop_images(seq)
            self.cache.release(seq.id)
            if seq in self.running:
                self.running.remove(seq)
            if self._images is not None and not any(s.images is not None for s in self.running):
                self._images.forget()  # the stacked image context of finished sequences
        if reason is not None:
            seq.sink(Token(None, reason, error=error))

    # -- the model and the sampler (engine thread, outside the lock) ---------------------------------------------
    def _forward(self, seqs: list[SeqState], new: int) -> torch.Tensor:
        view = self.cache.view([s.id for s in seqs], [s.cached for s in seqs], new)
        tokens = torch.tensor([s.tokens[s.cached : s.cached + new] for s in seqs], device=view.key_mask.device)
        # Only each row's last position is sampled: skip the vocabulary projection of the rest of a prefill chunk.
        logits = self._run(seqs, tokens, view, last_only=True)
        for s in seqs:
            if s.cached < s.prompt_len:
                self.stats["prompt_tokens"] += min(new, s.prompt_len - s.cached)
            s.cached += new
            self.cache.register(s.id, s.tokens, s.cached)
        return logits

    def _run(self, seqs: list[SeqState], tokens: torch.Tensor, view, last_only: bool = False) -> torch.Tensor:
        """The model over one step's rows; rows with images read their own (vision_inputs.BatchImages)."""
        kw = {}
        if any(s.images is not None for s in seqs):
            if self._images is None:
                from ..vision_inputs import BatchImages

                self._images = BatchImages()
            tokens, kw["images"] = self._images.inputs(self.net, [s.images for s in seqs], tokens, view.positions)
        return self.net(tokens, positions=view.positions, cache=view, key_mask=view.key_mask, last_only=last_only,
                        **kw)

    def _encode_images(self, seq: SeqState) -> bool:
        """Run the vision encoder for a sequence about to prefill (once; kept while it lives). A failure ends
        that sequence with an error, not the step: the other sequences go on."""
        try:
            seq.images.encode(self.net)
            return True
        except Exception as exc:  # noqa: BLE001 - reported to this request only
            log.exception("encoding the images of sequence %d failed", seq.id)
            self._finish(seq, "error", f"the images could not be encoded: {type(exc).__name__}: {exc}")
            return False

    def _speculative_decode(self, seqs: list[SeqState], k: int) -> None:
        """One forward of every decoding row's last token and its proposals (padded to k), then verification."""
        from .speculative import Proposal, token_record, verify

        proposals = []
        for s in seqs:
            room = k
            if s.params.max_tokens is not None:
                room = min(room, s.params.max_tokens - len(s.generated) - 1)
            p = s.proposer.propose(s.tokens, s.prompt_len, room, s.sampler) if s.proposer and room > 0 else None
            proposals.append(p or Proposal([]))
        view = self.cache.view([s.id for s in seqs], [s.cached for s in seqs], 1 + k)
        rows = [[s.tokens[-1]] + p.tokens + [s.tokens[-1]] * (k - len(p.tokens)) for s, p in zip(seqs, proposals)]
        logits = self._run(seqs, torch.tensor(rows, device=view.key_mask.device), view)  # (B, 1 + k, V)
        for i, (seq, proposal) in enumerate(zip(seqs, proposals)):
            if seq.proposer is None:
                seq.cached += 1
                self.cache.register(seq.id, seq.tokens, seq.cached)
                self._sample(seq, logits[i : i + 1, 0])
                continue
            result = verify(seq.sampler, logits[i, : 1 + len(proposal.tokens)], seq.tokens, seq.prompt_len, proposal)
            seq.tracker.update(len(proposal.tokens), result.accepted)
            self.stats["spec_proposed"] += len(proposal.tokens)
            self.stats["spec_accepted"] += result.accepted
            seq.cached += 1 + result.accepted  # the keys of all but the newest token; later slots roll back
            self.cache.register(seq.id, seq.tokens + result.tokens, seq.cached)
            for j, token_id in enumerate(result.tokens):
                if self._emit(seq, token_record(logits[i, j], token_id, seq.sampler)):
                    break
            else:
                seq.proposer.keep(seq.cached)

    def _sample(self, seq: SeqState, logits: torch.Tensor) -> None:
        if seq.constraint is not None:
            logits = logits.clone()
            seq.constraint.mask(logits)
        out = seq.sampler(logits, [seq.tokens], [seq.generated])
        token = Token(int(out.tokens[0]))
        if seq.constraint is not None:
            seq.constraint.accept(token.id)
        if out.logprobs is not None:
            token.logprob = float(out.logprobs[0])
        if out.top_ids is not None:
            token.top_logprobs = [(int(i), float(lp)) for i, lp in zip(out.top_ids[0], out.top_logprobs[0])]
        self._emit(seq, token)

    def _emit(self, seq: SeqState, token: Token) -> bool:
        """Append a sampled token, decide whether it ends the sequence, hand it to the sink; True at the end."""
        seq.tokens.append(token.id)
        self.stats["generated_tokens"] += 1
        if token.id in seq.stop_ids:
            token.finish_reason, token.stop_token = "stop", True
        elif seq.constraint is not None and seq.constraint.done:
            token.finish_reason = "stop"
        elif seq.params.max_tokens is not None and len(seq.generated) >= seq.params.max_tokens:
            token.finish_reason = "length"
        elif len(seq.tokens) >= self.max_context:
            token.finish_reason = "length"
        if token.finish_reason:
            self._finish(seq, None)  # blocks free before the caller hears of the end (and maybe checks)
        seq.sink(token)
        return token.finish_reason is not None

    # -- background loop ---------------------------------------------------------------------------------------
    def run(self) -> None:
        """Step until `stop` is called and no work is left (graceful: in-flight requests finish).

        A step that raises fails the sequences it was running (their sinks get an "error" end and their
        blocks are freed) and the loop goes on: one bad step must not leave every client waiting forever."""
        while not (self._stopping and not (self.waiting or self.running)):
            try:
                progressed = self.step()
            except Exception as exc:  # noqa: BLE001 - reported to each affected request, then serving goes on
                log.exception("engine step failed; failing %d running request(s)", len(self.running))
                self.fail_running(f"generation failed: {type(exc).__name__}: {exc}")
                progressed = True
            if not progressed:
                self.wait_for_work(timeout=0.05)

    def fail_running(self, message: str) -> None:
        with self._lock:
            for seq in list(self.running):
                self._finish(seq, "error", message)
