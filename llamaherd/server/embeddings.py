"""Embedding routes: OpenAI /v1/embeddings, Ollama /api/embed and the older /api/embeddings (engine/embedding.py).

Every route returns mean-pooled final hidden states, L2-normalised (llama.cpp's `--pooling mean`), and names
the pooling in its response. A text longer than the context window is refused (400) unless the request asks
for truncation explicitly (Ollama's `truncate: true`): nothing is shortened silently.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Literal

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..engine.embedding import POOLING, embed
from .http import APIError, check_model, served_of
from .runtime import ServedModel

router = APIRouter()

MAX_INPUTS = 2048  # OpenAI's limit on inputs per request


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class OpenAIEmbeddingRequest(_Body):
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)

    @field_validator("input")
    @classmethod
    def _inputs(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("input must not be an empty list")
        if isinstance(v, list) and len(v) > MAX_INPUTS and not isinstance(v[0], int):
            raise ValueError(f"at most {MAX_INPUTS} inputs per request")
        return v


class OllamaEmbedRequest(_Body):
    model: str | None = None
    input: str | list[str]
    truncate: bool | None = None
    dimensions: int | None = Field(default=None, ge=1)


class OllamaEmbeddingsRequest(_Body):
    model: str | None = None
    prompt: str


def _token_ids(served: ServedModel, inputs, truncate: bool = False) -> list[list[int]]:
    """Each input as token ids (texts encoded with BOS, as llama.cpp tokenizes them), checked against the window."""
    if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
        inputs = [inputs]
    vocab, limit = served.model.config.vocab_size, served.context_length
    out = []
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            if not item:
                raise APIError(400, f"input {i} is an empty string: there is nothing to embed", param="input")
            ids = served.tokenizer.encode(item, bos=served.tokenizer.bos_id is not None)
        else:
            ids = list(item)
            if not ids or any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"input {i}: token ids must be non-empty and in [0, {vocab})", param="input")
        if len(ids) > limit:
            if not truncate:
                raise APIError(400, f"input {i} is {len(ids)} tokens but the context window is {limit} tokens; "
                                    "shorten it, or ask for truncation explicitly (Ollama: \"truncate\": true)",
                               param="input", code="context_length_exceeded")
            ids = ids[:limit]
        out.append(ids)
    return out


async def _embed(served: ServedModel, ids: list[list[int]], dimensions: int | None) -> np.ndarray:
    dim = served.model.config.dim
    if dimensions is not None and dimensions > dim:
        raise APIError(400, f"dimensions {dimensions} exceeds this model's embedding size {dim}", param="dimensions")
    # The forward runs on a worker thread beside the engine's: the event loop keeps serving.
    vectors = await asyncio.to_thread(embed, served.model.net, ids, served.context_length)
    if dimensions is not None:  # as OpenAI's `dimensions`: keep the first ones, normalise again
        vectors = vectors[:, :dimensions]
        vectors = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return vectors.float().numpy()


@router.post("/v1/embeddings")
async def openai_embeddings(body: OpenAIEmbeddingRequest, request: Request):
    served = served_of(request)
    check_model(served, body.model)
    ids = _token_ids(served, body.input)
    vectors = await _embed(served, ids, body.dimensions)

    def encoded(v: np.ndarray):
        if body.encoding_format == "base64":  # little-endian float32, as OpenAI sends it
            return base64.b64encode(v.astype("<f4").tobytes()).decode()
        return v.tolist()

    tokens = sum(len(x) for x in ids)
    return {"object": "list", "model": served.name, "pooling": POOLING,
            "data": [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


@router.post("/api/embed")
async def ollama_embed(body: OllamaEmbedRequest, request: Request):
    served = served_of(request)
    check_model(served, body.model)
    started = time.perf_counter()
    ids = _token_ids(served, body.input, truncate=bool(body.truncate))
    vectors = await _embed(served, ids, body.dimensions)
    return {"model": served.name, "embeddings": vectors.tolist(), "pooling": POOLING,
            "total_duration": int((time.perf_counter() - started) * 1e9), "load_duration": 0,
            "prompt_eval_count": sum(len(x) for x in ids)}


@router.post("/api/embeddings")
async def ollama_embeddings(body: OllamaEmbeddingsRequest, request: Request):
    """Ollama's older route: one prompt, one `embedding` (normalised here too, as every route of this server)."""
    served = served_of(request)
    check_model(served, body.model)
    if not body.prompt:  # Ollama answers an empty prompt with an empty embedding
        return {"embedding": [], "pooling": POOLING}
    vectors = await _embed(served, _token_ids(served, body.prompt), None)
    return {"embedding": vectors[0].tolist(), "pooling": POOLING}
