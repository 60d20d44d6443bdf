"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models (streaming as server-sent events)."""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator

import torch
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..engine.text import Piece
from .http import APIError, check_model, ending_in_error, served_of, unless_disconnected
from .prompting import messages_for_format, openai_images, openai_tool_calls, sampling_params
from .runtime import ServedModel, Usage, interleave
from .schemas import ChatCompletionRequest, CompletionRequest
from .shielding import filter_reply, refuse_input, shield_stream

router = APIRouter()


def _sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _sse_error(message: str, code: str) -> str:
    """The event that ends a stream whose generation failed: OpenAI's error shape, which its client raises as
    `openai.APIError` (openai/_streaming.py: a `data:` payload with an `error` key)."""
    return _sse({"error": {"message": message, "type": "server_error", "param": None, "code": code}})


def _usage(usages: list[Usage]) -> dict:
    prompt = usages[0].prompt_tokens if usages else 0
    completion = sum(u.completion_tokens for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _seeded(params, i: int):
    return params if params.seed is None or i == 0 else params.replace(seed=params.seed + i)


def _own(constraint, i: int):
    """Choice i's grammar state: the request's constraint for the first choice, a fresh copy for the others."""
    return constraint if constraint is None or i == 0 else constraint.fresh()


def _chat_logprobs(served: ServedModel, chunks: list[Piece]) -> dict:
    tok = served.tokenizer

    def entry(token_id: int, logprob: float) -> dict:
        raw = tok.token_bytes(token_id)
        return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}

    content = []
    for c in chunks:
        if c.token is None or c.logprob is None:
            continue
        item = entry(c.token, c.logprob)
        item["top_logprobs"] = [entry(t, lp) for t, lp in (c.top_logprobs or [])]
        content.append(item)
    return {"content": content}


# -------------------------------------------------------------------------------------------------------------
# /v1/chat/completions
# -------------------------------------------------------------------------------------------------------------


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    served = served_of(request)
    check_model(served, body.model)
    messages = messages_for_format([m.model_dump() for m in body.messages])
    images = openai_images(messages)  # data: URLs only; a text-only model refuses them (ImageError, a 400)
    fmt = served.model.chat_format(images=bool(images))
    tools = [t.model_dump() for t in body.tools] if body.tools and body.tool_choice != "none" else None
    prompt = fmt.encode_dialog(messages, tools=tools, add_generation_prompt=True)
    images = await served.prepare_images(prompt, images) if images else None
    params = sampling_params(
        served.model.generation_defaults,
        max_tokens=body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens,
        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p, typical_p=body.typical_p,
        repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, logit_bias=body.logit_bias, seed=body.seed, stop=tuple(body.stop or ()),
        ignore_eos=body.ignore_eos or None, logprobs=body.logprobs or None, top_logprobs=body.top_logprobs or None,
    )
    if body.max_tokens is None and body.max_completion_tokens is None:
        params = params.replace(max_tokens=None)
    constraint = _constraint_for(served, body)
    refusal = await refuse_input(request, messages, model=served.name, n=body.n, stream=body.stream)
    if refusal is not None:  # the server's guard refused the input (server/shielding.py)
        return refusal
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "object": "chat.completion", "created": created, "model": served.name}

    if body.stream:
        served.check(prompt, params, body.n, images)  # errors as a status code now, not after the 200 is sent
        shield = functools.partial(shield_stream, request, messages)
        events = _chat_stream(served, fmt, prompt, params, body, head, tools, constraint, shield, images)
        return StreamingResponse(ending_in_error(events, _sse_error), media_type="text/event-stream")

    usages = [Usage() for _ in range(body.n)]
    results = await unless_disconnected(request, asyncio.gather(*(
        served.complete(prompt, _seeded(params, i), usages[i], constraint=_own(constraint, i), images=images,
                        speculate=body.speculative)
        for i in range(body.n))))
    choices = []
    for i, (text, chunks, finish) in enumerate(results):
        text, finish = await filter_reply(request, messages, text, finish)
        chunks = chunks if finish != "content_filter" else []
        message = fmt.parse_assistant(text) if tools else {"role": "assistant", "content": text}
        calls = openai_tool_calls(message)
        out = {"role": "assistant", "content": message.get("content") if not calls else (message.get("content") or None)}
        if calls:
            out["tool_calls"] = calls
            finish = "tool_calls"
        choice = {"index": i, "message": out, "finish_reason": _finish(finish)}
        choice["logprobs"] = _chat_logprobs(served, chunks) if body.logprobs else None
        choices.append(choice)
    return {**head, "choices": choices, "usage": _usage(usages)}


def _finish(reason: str | None) -> str:
    return {"cancelled": "stop", "error": "stop", None: "stop"}.get(reason, reason)


async def _chat_stream(served, fmt, prompt, params, body, head, tools, constraint, shield,
                       images=None) -> AsyncIterator[str]:
    head = {**head, "object": "chat.completion.chunk"}
    usages = [Usage() for _ in range(body.n)]

    def chunk(i: int, delta: dict, finish: str | None = None, logprobs=None) -> str:
        return _sse({**head, "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})

    for i in range(body.n):
        yield chunk(i, {"role": "assistant", "content": ""})
    # With tools, each choice's text goes through the format's streaming tool-call parser: plain content is
    # shown as it comes (held back only while it could still open a call), a tool call is sent whole at the end.
    parsers = [fmt.stream_parser() for _ in range(body.n)] if tools else None
    streams = [shield(served.stream(prompt, _seeded(params, i), usages[i], constraint=_own(constraint, i),
                                    images=images, speculate=body.speculative))
               for i in range(body.n)]
    # n > 1: the choices decode together and their chunks interleave in arrival order, each tagged by index;
    # within one choice the order is the generation order, and its finish chunk comes last.
    async for i, c in interleave(streams):
        if parsers:
            shown = parsers[i].feed(c.text)
            if shown:
                yield chunk(i, {"content": shown})
        elif c.text or (body.logprobs and c.token is not None):
            lp = _chat_logprobs(served, [c]) if body.logprobs else None
            yield chunk(i, {"content": c.text}, None, lp)
        if c.finish_reason is None:
            continue
        finish = c.finish_reason
        if parsers:
            rest = parsers[i].flush()
            if rest:
                yield chunk(i, {"content": rest})
            calls = openai_tool_calls(parsers[i].finish())
            if calls:
                yield chunk(i, {"tool_calls": [{**call, "index": k} for k, call in enumerate(calls)]})
                finish = "tool_calls"
        yield chunk(i, {}, _finish(finish))
    if body.stream_options and body.stream_options.include_usage:
        yield _sse({**head, "choices": [], "usage": _usage(usages)})
    yield "data: [DONE]\n\n"


def _constraint_for(served: ServedModel, body: ChatCompletionRequest):
    """A grammar that output must follow: json_object / json_schema, or tool_choice required / named."""
    from .constrain import constraint_for_request

    return constraint_for_request(served, body)


# -------------------------------------------------------------------------------------------------------------
# /v1/completions
# -------------------------------------------------------------------------------------------------------------


def _echo(served: ServedModel, prompt: list[int]) -> str:
    """The prompt as text, without the begin-of-text token the server added (as vLLM's echo)."""
    bos = served.tokenizer.bos_id
    return served.tokenizer.decode(prompt[1:] if prompt and prompt[0] == bos else prompt)


def _prompts(served: ServedModel, prompt) -> list[list[int]]:
    tok, vocab = served.tokenizer, served.model.config.vocab_size
    if isinstance(prompt, str) or all(isinstance(p, str) for p in prompt):
        # An empty prompt is refused, as `herd run ""` is (README): nothing to complete is a mistake, not a request.
        if any(not p.strip() for p in ([prompt] if isinstance(prompt, str) else prompt)):
            raise APIError(400, "prompt is empty: give the text to complete", param="prompt")
    if isinstance(prompt, str):
        return [tok.encode(prompt, bos=True)]
    if all(isinstance(p, int) for p in prompt):
        prompts = [prompt]
    elif all(isinstance(p, str) for p in prompt):
        return [tok.encode(p, bos=True) for p in prompt]
    else:
        prompts = prompt
    for p in prompts:
        if not p or any(not 0 <= t < vocab for t in p):
            raise APIError(400, f"prompt token ids must be non-empty and in [0, {vocab})", param="prompt")
    return [list(p) for p in prompts]


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    served = served_of(request)
    check_model(served, body.model)
    prompts = _prompts(served, body.prompt)
    params = sampling_params(
        served.model.generation_defaults, max_tokens=16 if body.max_tokens is None else body.max_tokens,
        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p, typical_p=body.typical_p,
        repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, logit_bias=body.logit_bias, seed=body.seed, stop=tuple(body.stop or ()),
        ignore_eos=body.ignore_eos or None, logprobs=body.logprobs is not None or None,
        top_logprobs=body.logprobs or None,
    )
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": served.name}
    jobs = [(p, _seeded(params, i)) for p in prompts for i in range(body.n)]
    usages = [Usage() for _ in jobs]
    if body.stream:
        for p, sp in jobs:
            served.check(p, sp, len(jobs))
        return StreamingResponse(ending_in_error(_completion_stream(served, jobs, usages, body, head), _sse_error),
                                 media_type="text/event-stream")
    results = await unless_disconnected(request, asyncio.gather(*(served.complete(p, sp, u, speculate=body.speculative)
                                                                  for (p, sp), u in zip(jobs, usages))))
    choices = []
    for i, ((p, _), (text, chunks, finish)) in enumerate(zip(jobs, results)):
        echo = _echo(served, p) if body.echo else ""
        choice = {"index": i, "text": echo + text, "finish_reason": _finish(finish), "logprobs": None}
        if body.logprobs is not None:
            choice["logprobs"] = _completion_logprobs(served, chunks, len(echo))
            if body.echo:  # the prompt's own log-probabilities first, as OpenAI's legacy API and vLLM give them
                # an end token that stopped generation has no piece of its own: its entry comes from the same
                # forward (vLLM lists the end token too; lm-eval drops the last entry as the generated one)
                end = next((c.stop_token for c in chunks if c.stop_token is not None), None)
                tail = end if not choice["logprobs"]["tokens"] else None
                choice["logprobs"] = _joined(await asyncio.to_thread(_prompt_logprobs, served, p, body.logprobs, tail),
                                             choice["logprobs"])
        choices.append(choice)
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(u.completion_tokens for u in usages)
    return {**head, "choices": choices, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                                  "total_tokens": prompt_tokens + completion_tokens}}


def _completion_logprobs(served: ServedModel, chunks: list[Piece], offset: int = 0) -> dict:
    tok = served.tokenizer
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in chunks:
        if c.token is None or c.logprob is None:
            continue
        piece = tok.token_bytes(c.token).decode("utf-8", "replace")
        out["text_offset"].append(offset)
        offset += len(c.text)
        out["tokens"].append(piece)
        out["token_logprobs"].append(c.logprob)
        out["top_logprobs"].append({tok.token_bytes(t).decode("utf-8", "replace"): lp for t, lp in c.top_logprobs or []})
    return out


def _prompt_logprobs(served: ServedModel, prompt: list[int], top: int, then: int | None = None) -> dict:
    """log p(prompt[i] | prompt[:i]) for every prompt token (None for the first) and the `top` likeliest tokens
    at each position, from one full forward (lm-eval's local-completions scores continuations this way); with
    `then`, one more entry for that token after the prompt."""
    tok = served.tokenizer
    logp = torch.log_softmax(served.model.logits(prompt).double(), dim=-1)  # (T, V)
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    seq = prompt if then is None else [*prompt, then]
    for i, t in enumerate(seq):
        piece = tok.token_bytes(t).decode("utf-8", "replace")
        out["tokens"].append(piece)
        out["text_offset"].append(offset)
        offset += len(piece)
        if i == 0:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(float(logp[i - 1, t]))
        vals, ids = logp[i - 1].topk(max(top, 1))
        out["top_logprobs"].append({tok.token_bytes(int(j)).decode("utf-8", "replace"): float(v)
                                    for j, v in zip(ids, vals)})
    return out


def _joined(prompt_lp: dict, generated: dict) -> dict:
    end = prompt_lp["text_offset"][-1] + len(prompt_lp["tokens"][-1]) if prompt_lp["tokens"] else 0
    return {"tokens": prompt_lp["tokens"] + generated["tokens"],
            "token_logprobs": prompt_lp["token_logprobs"] + generated["token_logprobs"],
            "top_logprobs": prompt_lp["top_logprobs"] + generated["top_logprobs"],
            "text_offset": prompt_lp["text_offset"] + [end + o for o in generated["text_offset"]]}


async def _completion_stream(served, jobs, usages, body, head) -> AsyncIterator[str]:
    if body.echo:
        for i, (p, _) in enumerate(jobs):
            yield _sse({**head, "choices": [{"index": i, "text": _echo(served, p), "finish_reason": None,
                                             "logprobs": None}]})
    streams = [served.stream(p, sp, usage, speculate=body.speculative) for (p, sp), usage in zip(jobs, usages)]
    async for i, c in interleave(streams):  # every prompt x n choice at once, chunks in arrival order
        lp = _completion_logprobs(served, [c]) if body.logprobs is not None else None
        if c.text or c.finish_reason or lp:
            yield _sse({**head, "choices": [{"index": i, "text": c.text, "logprobs": lp,
                                             "finish_reason": _finish(c.finish_reason) if c.finish_reason else None}]})
    if body.stream_options and body.stream_options.include_usage:
        prompt_tokens = sum(len(p) for p, _ in jobs) // max(body.n, 1)
        completion = sum(u.completion_tokens for u in usages)
        yield _sse({**head, "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                                     "total_tokens": prompt_tokens + completion}})
    yield "data: [DONE]\n\n"


@router.get("/v1/models")
async def models(request: Request):
    served = served_of(request)
    return {"object": "list", "data": [{"id": served.name, "object": "model", "created": served.created,
                                        "owned_by": "llamaherd", "max_model_len": served.context_length}]}
