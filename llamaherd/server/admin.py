"""Operations routes: /health, /metrics (Prometheus). (/tokenize and /detokenize: server/tokenize.py.)"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from .http import served_of

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    served = served_of(request)
    return {"status": "ok", "model": served.name, "running": served.engine.num_running,
            "waiting": served.engine.num_waiting}


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request):
    served = served_of(request)
    return PlainTextResponse(served.metrics.render(served.engine), media_type="text/plain; version=0.0.4")
