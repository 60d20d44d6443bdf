"""Shields on /v1/chat/completions: the request's input checked before generating, the reply after it (a
streamed reply on growing text every `stream_every` tokens, held back until checked, cut when unsafe).

A refused input answers as OpenAI does for filtered content (an empty assistant message with
`finish_reason: "content_filter"`), or with a 400 when the server is started with `--guard-refusal error`.
A request may skip the shields with the header `X-Guard: off` only when the server allows it (`--guard-opt-out`).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from .http import APIError

OPT_OUT_HEADER = "x-guard"


def shields_for(request: Request):
    """The app's shields, or None when the server has none or this request opted out (with permission)."""
    shields = getattr(request.app.state, "shields", None)
    if shields is None or shields.guard is None and shields.prompt_guard is None:
        return None
    if request.headers.get(OPT_OUT_HEADER, "").strip().lower() in ("off", "false", "0"):
        if not shields.allow_opt_out:
            raise APIError(403, "this server does not let requests skip its guard (X-Guard: off); its operator "
                                "can allow it with `herd serve --guard-opt-out`", type_="permission_error",
                           code="guard_opt_out_not_allowed")
        return None
    return shields


async def refuse_input(request: Request, messages: Sequence[Mapping], *, model: str, n: int = 1,
                       stream: bool = False):
    """None when the input passes; otherwise the response to send instead of generating."""
    shields = shields_for(request)
    if shields is None:
        return None
    result = await run_in_threadpool(shields.check_input, messages)
    if result.allowed:
        return None
    if shields.on_input == "error":
        raise APIError(400, f"the request was refused by the server's guard: {result.reason()}",
                       code="content_filter")
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
    if not stream:
        choices = [{"index": i, "message": {"role": "assistant", "content": ""}, "finish_reason": "content_filter",
                    "logprobs": None} for i in range(n)]
        return {**head, "object": "chat.completion", "choices": choices,
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}

    async def events() -> AsyncIterator[str]:
        for i in range(n):
            for delta, finish in (({"role": "assistant", "content": ""}, None), ({}, "content_filter")):
                chunk = {**head, "object": "chat.completion.chunk",
                         "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}]}
                yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def filter_reply(request: Request, messages: Sequence[Mapping], text: str, finish: str | None
                       ) -> tuple[str, str | None]:
    """A finished reply and its finish reason, or ("", "content_filter") when the output shield refuses it."""
    shields = shields_for(request)
    if shields is None or not shields.screen_output or not text:
        return text, finish
    result = await run_in_threadpool(shields.check_reply, messages, text)
    return (text, finish) if result.allowed else ("", "content_filter")


async def shield_stream(request: Request, messages: Sequence[Mapping], pieces: AsyncIterator) -> AsyncIterator:
    """Pieces of a streamed reply, released only after the text so far passed the output shield.

    The check runs every `stream_every` tokens and at the end; an unsafe check ends the stream with one empty
    piece whose finish_reason is "content_filter" (the pieces since the last passing check are dropped).
    """
    shields = shields_for(request)
    if shields is None or not shields.screen_output or shields.guard is None:
        async for p in pieces:
            yield p
        return
    text, held, since = "", [], 0
    try:
        async for p in pieces:
            text += p.text
            held.append(p)
            since += p.token is not None
            if since < shields.stream_every and p.finish_reason is None:
                continue
            since = 0
            if text.strip():
                result = await run_in_threadpool(shields.check_reply, messages, text)
                if not result.allowed:
                    yield type(p)(text="", token=None, finish_reason="content_filter")
                    return
            for q in held:
                yield q
            held = []
    finally:
        await pieces.aclose()
