"""HTTP helpers shared by the app and its routers: OpenAI-shaped errors, the served model of a request,
the model-name check, and cancelling a plain (non-streaming) generation when its client goes away."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import JSONResponse

if TYPE_CHECKING:
    from .runtime import ServedModel


class APIError(Exception):
    """An error with an HTTP status, rendered as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


class ClientGone(Exception):
    """The client closed its connection before its answer was ready (logged as 499, nginx's code)."""


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status_code=status)


def served_of(request: Request) -> ServedModel:
    return request.app.state.served


def check_model(served: ServedModel, name: str | None) -> None:
    """Requests may omit the model or name the served one; anything else is a 404 naming what is served."""
    if name and name not in (served.name, served.name.split(":")[0]):
        raise APIError(404, f"model {name!r} is not served here; this server serves {served.name!r}",
                       type_="not_found_error", param="model", code="model_not_found")


async def unless_disconnected(request: Request, awaitable):
    """Await a non-streaming generation, cancelling it (and so its engine requests) if the client goes away
    first. Streaming responses get this from Starlette; plain ones do not, so a task waits on the ASGI receive
    channel, which (the body being read) yields nothing until the disconnect, as Starlette's own listener."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ClientGone()
    finally:
        for t in (task, watcher):
            if not t.done():
                t.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
