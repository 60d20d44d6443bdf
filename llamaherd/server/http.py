"""HTTP helpers shared by the app and its routers: OpenAI-shaped errors, the served model of a request,
the model-name check, cancelling a plain (non-streaming) generation when its client goes away, and ending a
stream whose generation fails with an error event."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import JSONResponse

from ..engine.scheduler import GenerationError

if TYPE_CHECKING:
    from .runtime import ServedModel

log = logging.getLogger("llamaherd.server")

# How long the server keeps an idle keep-alive connection open (uvicorn's timeout_keep_alive; its default, 5 s,
# equals httpx's and so the openai client's keepalive_expiry). Equal limits race: a client reuses a connection it
# still counts as fresh just as the server closes it, and the request is met with a reset (httpx.ReadError, the
# one unexplained error of the fault soak). Longer than the clients' expiry, the client always lets go first.
KEEP_ALIVE_S = 15


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


async def ending_in_error(events: AsyncIterator[str], error_event: Callable[[str, str], str]) -> AsyncIterator[str]:
    """`events`, and if producing them fails (an engine step that raised, after the 200 was sent) one last event
    `error_event(message, code)` instead of a silently cut stream: OpenAI's SSE `{"error": ...}` event, Ollama's
    `{"error": "..."}` line. A client going away (cancellation) is not a failure: nothing is sent then."""
    async with contextlib.aclosing(events):  # closing this closes `events`, which cancels its engine requests
        try:
            async for event in events:
                yield event
        except GenerationError as exc:  # the engine logged it and freed the request's blocks
            yield error_event(str(exc), "generation_failed")
        except Exception as exc:  # noqa: BLE001 - a bug mid-stream: logged here, reported to the client
            log.exception("a streamed response failed")
            yield error_event(f"the server failed while streaming: {type(exc).__name__}", "internal_error")
