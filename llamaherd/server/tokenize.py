"""vLLM's tokenizer routes: GET /tokenizer_info, POST /tokenize, POST /detokenize (lm-eval's remote tokenizer).

lm-evaluation-harness's `local-completions` backend tokenizes through these when a server offers them
(lm_eval/utils.py `RemoteTokenizer`), so its token ids are this model's own. As vLLM (HF tokenizers) does,
special-token literals in /tokenize text (`<|begin_of_text|>`, `<bos>`) are control tokens here, and
`add_special_tokens` puts BOS in front.
"""

from __future__ import annotations

import re

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from .http import APIError, check_model, served_of

router = APIRouter()


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]


def encode_with_specials(tok, text: str) -> list[int]:
    """Token ids of `text` where each special-token literal becomes its control token, the rest plain text."""
    literals = sorted(tok.special_tokens, key=len, reverse=True)
    if not literals:
        return tok.encode(text)
    ids: list[int] = []
    for i, part in enumerate(re.split("(" + "|".join(map(re.escape, literals)) + ")", text)):
        if i % 2:
            ids.append(tok.special_tokens[part])
        elif part:
            ids.extend(tok.encode(part))
    return ids


def _literal(tok, id: int | None) -> str | None:
    return None if id is None else next((k for k, v in tok.special_tokens.items() if v == id), None)


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request):
    tok = served_of(request).tokenizer
    return {"tokenizer_class": tok.kind, "bos_token": _literal(tok, tok.bos_id), "eos_token": _literal(tok, tok.eos_id),
            "pad_token": None, "model_max_length": served_of(request).context_length}


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    served = served_of(request)
    check_model(served, body.model)
    tok = served.tokenizer
    ids = encode_with_specials(tok, body.prompt)
    if body.add_special_tokens and tok.bos_id is not None:
        ids = [tok.bos_id, *ids]
    return {"tokens": ids, "count": len(ids), "max_model_len": served.context_length}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    served = served_of(request)
    check_model(served, body.model)
    vocab = served.model.config.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside this model's vocabulary [0, {vocab})", param="tokens")
    return {"prompt": served.tokenizer.decode(body.tokens)}
