"""OpenAI-compatible /v1/moderations backed by the server's Llama Guard (see guard/shield.py for the category map)."""

from __future__ import annotations

import asyncio
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from .http import APIError

router = APIRouter()


class ModerationRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    input: str | list[str] | list[dict]
    model: str | None = None


def _inputs(value) -> list[str | list[dict]]:
    """OpenAI's input shapes: a string, a list of strings (one input each), or a list of typed parts, `text` and
    `image_url` (one input, as omni-moderation takes text with images): such an input becomes a user message's
    content, the images ahead of the joined text (the guard model must read images: Llama Guard 3 11B Vision)."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(v, str) for v in value):
        return list(value)
    if value and all(isinstance(v, dict) for v in value):
        kinds = {v.get("type") for v in value}
        if kinds - {"text", "image_url"}:
            raise APIError(400, f"input parts of type {sorted(str(k) for k in kinds - {'text', 'image_url'})} are not "
                                "supported: give 'text' and 'image_url' parts", param="input")
        if any(v.get("type") == "text" and not isinstance(v.get("text"), str) for v in value):
            raise APIError(400, "each text part needs a string 'text'", param="input")
        text = "\n".join(v["text"] for v in value if v.get("type") == "text")
        images = [v for v in value if v.get("type") == "image_url"]
        return [[*images, {"type": "text", "text": text}] if images else text]
    raise APIError(400, "input: give a string, a non-empty list of strings, or a list of text and image_url parts",
                   param="input")


@router.post("/v1/moderations")
async def moderations(body: ModerationRequest, request: Request):
    shields = getattr(request.app.state, "shields", None)
    if shields is None or shields.guard is None:
        raise APIError(404, "this server has no guard model: start it with `herd serve MODEL --guard GUARD_MODEL`",
                       type_="not_found_error", code="no_guard_model")
    name = getattr(request.app.state, "guard_name", None) or "llama-guard"
    if body.model and body.model != name:
        raise APIError(404, f"moderation model {body.model!r} is not served here; this server's guard is {name!r}",
                       type_="not_found_error", param="model", code="model_not_found")
    inputs = _inputs(body.input)
    from ..guard.shield import openai_result

    def one(content: str | list[dict]) -> dict:
        types = ("text", "image") if isinstance(content, list) else ("text",)
        return openai_result(shields.moderate([{"role": "user", "content": content}]), types)

    if getattr(shields.guard, "concurrent", False):  # a batching guard: the inputs are checked together
        results = list(await asyncio.gather(*(run_in_threadpool(one, c) for c in inputs)))
    else:
        results = await run_in_threadpool(lambda: [one(c) for c in inputs])
    return {"id": f"modr-{uuid.uuid4().hex}", "model": name, "results": results}


@router.get("/guard/metrics", response_class=PlainTextResponse)
async def guard_metrics(request: Request):
    """Verdict counters of the shields and of /v1/moderations, per check and category (Prometheus text)."""
    shields = getattr(request.app.state, "shields", None)
    if shields is None:
        raise APIError(404, "this server has no guard model: start it with `herd serve MODEL --guard GUARD_MODEL`",
                       type_="not_found_error", code="no_guard_model")
    return PlainTextResponse(shields.prometheus(), media_type="text/plain; version=0.0.4")


def install(app, shields, guard_name: str) -> None:
    """Give a created app its shields: /v1/moderations answers with them and the chat routes consult them."""
    app.state.shields = shields
    app.state.guard_name = guard_name
