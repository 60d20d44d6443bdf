"""Operations routes: /health, /tokenize, /detokenize (llama.cpp and vLLM field names), /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from .http import APIError, served_of
from .schemas import DetokenizeRequest, TokenizeRequest

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    served = served_of(request)
    return {"status": "ok", "model": served.name, "running": served.engine.num_running,
            "waiting": served.engine.num_waiting}


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    served = served_of(request)
    text = body.content if body.content is not None else body.prompt
    if text is None:
        raise APIError(400, "give the text to tokenize in 'content' (llama.cpp) or 'prompt' (vLLM)", param="content")
    special = body.add_special if body.add_special is not None else bool(body.add_special_tokens)
    tokens = served.tokenizer.encode(text, bos=special)
    return {"tokens": tokens, "count": len(tokens), "max_model_len": served.context_length}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    served = served_of(request)
    vocab = served.model.config.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})", param="tokens")
    text = served.tokenizer.decode(body.tokens)
    return {"content": text, "prompt": text}


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request):
    served = served_of(request)
    return PlainTextResponse(served.metrics.render(served.engine), media_type="text/plain; version=0.0.4")
