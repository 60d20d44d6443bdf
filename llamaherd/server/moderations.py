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


def _texts(value) -> list[str]:
    """OpenAI's three input shapes: a string, a list of strings, or a list of typed parts (one input)."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(v, str) for v in value):
        return list(value)
    if value and all(isinstance(v, dict) for v in value):
        kinds = {v.get("type") for v in value}
        if kinds - {"text"}:
            raise APIError(400, f"input parts of type {sorted(k for k in kinds if k != 'text')} are not supported: "
                                "this server's guard reads text only", param="input")
        if any(not isinstance(v.get("text"), str) for v in value):
            raise APIError(400, "each text part needs a string 'text'", param="input")
        return ["\n".join(v["text"] for v in value)]
    raise APIError(400, "input: give a string, a non-empty list of strings, or a list of text parts", param="input")


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
    texts = _texts(body.input)
    from ..guard.shield import openai_result

    def one(text: str) -> dict:
        return openai_result(shields.moderate([{"role": "user", "content": text}]))

    if getattr(shields.guard, "concurrent", False):  # a batching guard: the inputs are checked together
        results = list(await asyncio.gather(*(run_in_threadpool(one, t) for t in texts)))
    else:
        results = await run_in_threadpool(lambda: [one(t) for t in texts])
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
