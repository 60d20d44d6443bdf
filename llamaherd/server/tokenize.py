"""The tokenizer routes: GET /tokenizer_info, POST /tokenize, POST /detokenize (vLLM's, which lm-eval's remote
tokenizer calls, with llama.cpp's field names accepted too).

lm-evaluation-harness's `local-completions` backend tokenizes through these when a server offers them
(lm_eval/utils.py `RemoteTokenizer`), so its token ids are this model's own. As vLLM (HF tokenizers) and
llama.cpp (`parse_special`) do, special-token literals in /tokenize text (`<|begin_of_text|>`, `<bos>`) are
control tokens here. BOS goes in front with vLLM's `add_special_tokens` (default true, for its `prompt`) or
llama.cpp's `add_special` (default false, for its `content`).
"""

from __future__ import annotations

import re

from fastapi import APIRouter, Request

from .http import APIError, check_model, served_of
from .schemas import DetokenizeRequest, TokenizeRequest

router = APIRouter()


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
    text = body.prompt if body.prompt is not None else body.content
    if text is None:
        raise APIError(400, "give the text to tokenize in 'prompt' (vLLM) or 'content' (llama.cpp)", param="prompt")
    ids = encode_with_specials(tok, text)
    bos = next((f for f in (body.add_special_tokens, body.add_special) if f is not None), body.prompt is not None)
    if bos and tok.bos_id is not None:
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
    text = served.tokenizer.decode(body.tokens)
    return {"prompt": text, "content": text}  # vLLM's field, llama.cpp's
