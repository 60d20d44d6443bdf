"""The FastAPI application: OpenAI /v1, Ollama /api and operations routes over one served model.

Cross-cutting behaviour lives here: OpenAI-shaped JSON errors (4xx for every bad request, never a 5xx),
an optional API key on every route but /health, a request-body size limit (chunked bodies counted as they
arrive), CORS only for the origins given, one log line per request.
"""

from __future__ import annotations

import logging
import secrets
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.scheduler import GenerationError, QueueFull
from ..errors import ContextLengthError, LlamaherdError
from . import admin, embeddings, moderations, ollama, openai, page, tokenize
from .http import APIError, ClientGone, error_response
from .runtime import ServedModel

log = logging.getLogger("llamaherd.server")

MAX_BODY_BYTES = 8 << 20


def _status_of(exc: Exception) -> tuple[int, str | None]:
    if isinstance(exc, QueueFull):
        return 429, "queue_full"
    if isinstance(exc, GenerationError):
        return 500, "generation_failed"
    if isinstance(exc, ContextLengthError):
        return 400, "context_length_exceeded"
    return 400, None  # every other domain error (sampling, chat format, tokenizer...) is the request's fault


class _ChunkedBodyLimit:
    """A body sent without a Content-Length (chunked) is read here first, up to the limit: past it the answer is
    a 413 and the app never runs; within it the app reads the same messages. (`guard` checks Content-Length.)"""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or any(k == b"content-length" for k, _ in scope["headers"]):
            return await self.app(scope, receive, send)
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.limit:
                response = error_response(413, f"request body over {self.limit} bytes", code="body_too_large")
                return await response(scope, receive, send)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def create_app(served: ServedModel, *, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               cors_origins: tuple[str, ...] = ()) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        served.start()
        try:
            yield
        finally:
            served.shutdown()  # in-flight requests finish first (graceful SIGTERM under uvicorn)

    app = FastAPI(title="llamaherd", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.served = served

    @app.middleware("http")
    async def guard(request: Request, call_next):
        started = time.perf_counter()
        if api_key and not _public(request):
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
            if not secrets.compare_digest(token.encode(), api_key.encode()):
                response = error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                          "authentication_error", code="invalid_api_key")
                _log(request, response.status_code, started)
                return response
        if request.method == "POST" and "json" not in request.headers.get("content-type", ""):
            _treat_body_as_json(request)
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            response = error_response(413, f"request body over {max_body_bytes} bytes", code="body_too_large")
            _log(request, response.status_code, started)
            return response
        response = await call_next(request)
        _log(request, response.status_code, started)
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{loc}: {first.get('msg', 'invalid request')}" if loc else first.get("msg", "invalid request body")
        return error_response(400, message, param=loc or None)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone):
        return Response(status_code=499)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(LlamaherdError)
    async def _domain_error(request: Request, exc: LlamaherdError):
        status, code = _status_of(exc)
        return error_response(status, _without_paths(exc, served), "server_error" if status >= 500 else
                              "invalid_request_error", code=code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else
                              "invalid_request_error")

    app.add_middleware(_ChunkedBodyLimit, limit=max_body_bytes)
    if cors_origins:  # off unless asked for (--cors-origin): no other site's page may call this server
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["authorization", "content-type", "x-api-key"])
    app.include_router(openai.router)
    app.include_router(moderations.router)
    app.include_router(ollama.router)
    app.include_router(admin.router)
    app.include_router(page.router)
    app.include_router(embeddings.router)
    app.include_router(tokenize.router)
    return app


def _without_paths(exc: LlamaherdError, served: ServedModel) -> str:
    """An error's message as clients see it: the server's file paths (the model's source and its folder) are
    replaced by the served model's name; a checkpoint error gives only its problem."""
    text = getattr(exc, "problem", None) or str(exc)
    source = Path(served.model.checkpoint.source)
    paths = {str(p) for p in (source, source.resolve(), source.parent.resolve()) if p.is_absolute()}
    for p in sorted((p for p in paths if p != "/"), key=len, reverse=True):
        text = text.replace(p, served.name)
    return text


def _public(request: Request) -> bool:
    """Routes open without the API key: /health, the "is it running" root, and the web page's static files
    (which hold nothing secret and must load before the user can type a key)."""
    path = request.url.path
    return path == "/health" or (request.method in ("GET", "HEAD") and
                                 (path == "/" or path == page.PAGE_PATH or path.startswith(page.PAGE_PATH + "/")))


def _treat_body_as_json(request: Request) -> None:
    """Every POST body here is JSON. Ollama's own examples send it with plain `curl -d`, whose content type is
    form-urlencoded, and Ollama reads it as JSON regardless: do the same."""
    headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
    request.scope["headers"] = headers + [(b"content-type", b"application/json")]


def _log(request: Request, status: int, started: float) -> None:
    log.info("%s %s %d %.1fms", request.method, request.url.path, status, (time.perf_counter() - started) * 1e3)
