"""Ollama-compatible routes: /api/generate, /api/chat (NDJSON streams), /api/tags, /api/show, /api/ps, /api/version."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone

import torch
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

from .. import __version__
from ..errors import ImageError, LlamaherdError
from ..presets import count_parameters
from .http import APIError, check_model, ending_in_error, served_of, unless_disconnected
from .prompting import messages_for_format, ollama_images, ollama_tool_calls, sampling_params
from .runtime import ServedModel, Usage
from .schemas import OllamaChatRequest, OllamaGenerateRequest, OllamaOptions, OllamaShowRequest

router = APIRouter()

# The Ollama API version we follow (its /api/version); clients check it for feature support.
OLLAMA_API_VERSION = "0.6.0"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _params(served: ServedModel, options: OllamaOptions | None, fmt_constraint: bool = False):
    o = options or OllamaOptions()
    if o.num_ctx is not None and o.num_ctx > served.context_length:
        raise APIError(400, f"options.num_ctx {o.num_ctx} exceeds this server's context of {served.context_length}",
                       param="options.num_ctx")
    max_tokens = o.num_predict
    if max_tokens is not None and max_tokens < 0:  # -1 unlimited, -2 fill the context: both "until the end"
        max_tokens = -1
    return sampling_params(
        served.model.generation_defaults, temperature=o.temperature, top_k=o.top_k, top_p=o.top_p, min_p=o.min_p,
        typical_p=o.typical_p, repeat_penalty=o.repeat_penalty, repeat_last_n=o.repeat_last_n,
        presence_penalty=o.presence_penalty, frequency_penalty=o.frequency_penalty, seed=o.seed,
        stop=tuple(o.stop or ()), num_predict=max_tokens if max_tokens is not None else -1,
    )


def _chats(model) -> bool:
    """Whether /api/generate wraps the prompt in the chat format: not for a base model (no format, or a built-in
    one for a checkpoint without the template its instruction-tuned releases carry), as Ollama's {{ .Prompt }}."""
    try:
        return not model.chat_format_choice.completes
    except LlamaherdError:
        return False


def _format_constraint(served: ServedModel, fmt):
    if fmt is None or fmt == "":
        return None
    from .constrain import json_constraint

    if fmt == "json":
        return json_constraint(served, {"type": "object"})
    if isinstance(fmt, dict):
        return json_constraint(served, fmt)
    raise APIError(400, "format must be 'json' or a JSON schema object", param="format")


def _stats(usage: Usage, finish: str | None) -> dict:
    total = time.perf_counter() - usage.started
    first = (usage.first_token or time.perf_counter()) - usage.started
    return {
        "done": True, "done_reason": "length" if finish == "length" else "stop",
        "total_duration": int(total * 1e9), "load_duration": 0,
        "prompt_eval_count": usage.prompt_tokens, "prompt_eval_duration": int(first * 1e9),
        "eval_count": usage.completion_tokens, "eval_duration": int(max(total - first, 0) * 1e9),
    }


def _line(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


def _ndjson(gen: AsyncIterator[dict]) -> StreamingResponse:
    """An NDJSON stream; a generation that fails mid-way ends it with Ollama's `{"error": "..."}` line, which
    the ollama client raises as `ResponseError` (ollama/_client.py)."""
    async def lines():
        async for obj in gen:
            yield _line(obj)

    return StreamingResponse(ending_in_error(lines(), lambda message, code: _line({"error": message})),
                             media_type="application/x-ndjson")


def _with_images(message: dict, images: list[dict]) -> dict:
    """A message with Ollama's images as image parts ahead of its text (as Ollama places them)."""
    if not images:
        return message
    text = message.get("content") or ""
    return {**message, "content": images + ([{"type": "text", "text": text}] if text else [])}


@router.post("/api/generate")
async def generate(body: OllamaGenerateRequest, request: Request):
    served = served_of(request)
    check_model(served, body.model)
    base = {"model": served.name}
    image_parts = ollama_images(body.images)
    if image_parts and served.model.config.vision is None:
        raise ImageError("this model reads no images (text-only); remove the images or serve a vision model")
    if not body.prompt:  # Ollama answers an empty prompt by loading the model: report it loaded
        return {**base, "created_at": _now(), "response": "", "done": True, "done_reason": "load"}
    # A model without a chat format (a base model with no template) takes the prompt as it is, as Ollama's
    # default template `{{ .Prompt }}` does.
    if body.raw or not _chats(served.model):
        prompt = served.tokenizer.encode(body.prompt, bos=True)
        if image_parts:  # a base vision model: BOS, one <|image|> per image, then the text
            from ..vision_inputs import with_image_tokens

            prompt = with_image_tokens(served.model.net, served.tokenizer, prompt, len(image_parts))
    else:
        messages = ([{"role": "system", "content": body.system}] if body.system else []) + [
            _with_images({"role": "user", "content": body.prompt}, image_parts)]
        prompt = served.model.chat_format(images=bool(image_parts)).encode_dialog(messages, add_generation_prompt=True)
    images = await served.prepare_images(prompt, [p["image"] for p in image_parts]) if image_parts else None
    params = _params(served, body.options)
    speculate = body.options is None or body.options.speculative  # options.speculative=false: off for this one
    constraint = _format_constraint(served, body.format)
    usage = Usage()

    async def events():
        finish = None
        async for c in served.stream(prompt, params, usage, constraint=constraint, images=images,
                                     speculate=speculate):
            finish = c.finish_reason
            if c.text:
                yield {**base, "created_at": _now(), "response": c.text, "done": False}
        yield {**base, "created_at": _now(), "response": "", **_stats(usage, finish)}

    if body.stream:
        served.check(prompt, params, images=images)  # errors as a status code now, not after the 200 is sent
        return _ndjson(events())
    out, _, finish = await unless_disconnected(request, served.complete(prompt, params, usage, constraint=constraint,
                                                                       images=images, speculate=speculate))
    return {**base, "created_at": _now(), "response": out, **_stats(usage, finish)}


@router.post("/api/chat")
async def chat(body: OllamaChatRequest, request: Request):
    served = served_of(request)
    check_model(served, body.model)
    base = {"model": served.name}
    if not body.messages:
        return {**base, "created_at": _now(), "message": {"role": "assistant", "content": ""}, "done": True,
                "done_reason": "load"}
    parts = [ollama_images(m.images, f"messages[{i}].images") for i, m in enumerate(body.messages)]
    fmt = served.model.chat_format(images=any(parts))  # a text-only model refuses images (ImageError, a 400)
    tools = [t.model_dump() for t in body.tools] if body.tools else None
    messages = messages_for_format([_with_images(m.model_dump(exclude={"images"}), p)
                                    for m, p in zip(body.messages, parts)])
    prompt = fmt.encode_dialog(messages, tools=tools, add_generation_prompt=True)
    images = await served.prepare_images(prompt, [p["image"] for ps in parts for p in ps]) if any(parts) else None
    params = _params(served, body.options)
    speculate = body.options is None or body.options.speculative  # options.speculative=false: off for this one
    constraint = _format_constraint(served, body.format)
    usage = Usage()

    def final_message(text: str) -> dict:
        if not tools:
            return {"role": "assistant", "content": text}
        parsed = fmt.parse_assistant(text)
        msg = {"role": "assistant", "content": parsed.get("content") or ""}
        calls = ollama_tool_calls(parsed)
        if calls:
            msg["tool_calls"] = calls
        return msg

    async def events():
        finish = None
        parser = fmt.stream_parser() if tools else None  # content streams; a tool call is sent whole at the end
        async for c in served.stream(prompt, params, usage, constraint=constraint, images=images,
                                     speculate=speculate):
            finish = c.finish_reason
            shown = parser.feed(c.text) if parser else c.text
            if parser and finish:
                shown += parser.flush()
            if shown:
                yield {**base, "created_at": _now(), "message": {"role": "assistant", "content": shown}, "done": False}
        calls = ollama_tool_calls(parser.finish()) if parser else None
        if calls:
            yield {**base, "created_at": _now(), "message": {"role": "assistant", "content": "", "tool_calls": calls},
                   "done": False}
        yield {**base, "created_at": _now(), "message": {"role": "assistant", "content": ""}, **_stats(usage, finish)}

    if body.stream:
        served.check(prompt, params, images=images)  # errors as a status code now, not after the 200 is sent
        return _ndjson(events())
    out, _, finish = await unless_disconnected(request, served.complete(prompt, params, usage, constraint=constraint,
                                                                       images=images, speculate=speculate))
    return {**base, "created_at": _now(), "message": final_message(out), **_stats(usage, finish)}


def _details(served: ServedModel) -> dict:
    total, _ = count_parameters(served.model.config)
    dtype = str(next(served.model.net.parameters()).dtype).replace("torch.", "")
    quant = served.model.checkpoint.metadata.get("file_type") or dtype.upper()
    return {"parent_model": "", "format": served.model.checkpoint.metadata.get("format", "pytorch"),
            "family": served.model.config.arch, "families": [served.model.config.arch],
            "parameter_size": f"{total / 1e9:.2f}B" if total >= 1e9 else f"{total / 1e6:.0f}M",
            "quantization_level": str(quant)}


# ---- metadata: what /api/tags, /api/ps and /api/show report -------------------------------------------------

_FACTS: dict[int, tuple[int, str, float]] = {}  # id(ServedModel) -> (size, digest, mtime), computed once


def _files_facts(served: ServedModel) -> tuple[int, str, float]:
    """(bytes of the model's files, their sha256 as `herd list` shows it, the files' mtime). A model built in
    memory (no files) reports its tensors' bytes and their sha256, and the server's start time."""
    from pathlib import Path

    from .. import store

    source = Path(served.model.checkpoint.source)
    if source.exists():
        files = store.model_files(source)
        return store.model_size(source), store.model_digest(source), max(f.stat().st_mtime for f in files)
    seen, size, digest = set(), 0, hashlib.sha256()
    for t in [*served.model.net.parameters(), *served.model.net.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key in seen or t.device.type == "meta":
            continue
        seen.add(key)
        size += t.numel() * t.element_size()
        digest.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return size, digest.hexdigest(), float(served.created)


async def _facts(served: ServedModel) -> tuple[int, str, float]:
    key = id(served)
    if key not in _FACTS:  # hashing a large file takes seconds: off the event loop, once per served model
        _FACTS[key] = await asyncio.to_thread(_files_facts, served)
    return _FACTS[key]


def _time(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


def capabilities(model) -> list[str]:
    """What the model can do, in Ollama's words: completion always, embedding (mean pooling) always; chat when
    it has a chat format, tools when that format renders tool definitions, vision with an image encoder."""
    caps = ["completion"]
    if model.has_chat_format:
        caps.append("chat")
        fmt = model.chat_format()
        probe = "capability_probe_tool"
        tool = {"type": "function", "function": {"name": probe, "description": "d",
                                                 "parameters": {"type": "object", "properties": {}}}}
        try:  # a format that can call tools shows their definitions to the model; others refuse or drop them
            rendered = fmt.render([{"role": "user", "content": "x"}], tools=[tool])
        except LlamaherdError:
            rendered = ""
        if probe in rendered:
            caps.append("tools")
    if getattr(model.config, "vision", None) is not None:
        caps.append("vision")
    caps.append("embedding")
    return caps


@router.get("/api/tags")
async def tags(request: Request):
    served = served_of(request)
    size, digest, mtime = await _facts(served)
    return {"models": [{"name": served.name, "model": served.name, "modified_at": _time(mtime), "size": size,
                        "digest": digest, "details": _details(served)}]}


@router.post("/api/show")
async def show(body: OllamaShowRequest, request: Request):
    served = served_of(request)
    name = body.model or body.name
    if not name:
        raise APIError(400, "give the model to show in 'model'", param="model")
    check_model(served, name)
    config = served.model.config
    info = {"general.architecture": config.arch, "general.parameter_count": count_parameters(config)[0],
            f"{config.arch}.context_length": config.max_seq_len, f"{config.arch}.embedding_length": config.dim,
            f"{config.arch}.block_count": config.n_layers, f"{config.arch}.attention.head_count": config.n_heads,
            f"{config.arch}.attention.head_count_kv": config.n_kv_heads}
    template = served.model.checkpoint.chat_template or ""
    _, _, mtime = await _facts(served)
    return {"modelfile": f"FROM {served.name}\n", "parameters": "", "template": template,
            "details": _details(served), "model_info": info, "capabilities": capabilities(served.model),
            "modified_at": _time(mtime)}


@router.get("/api/ps")
async def ps(request: Request):
    served = served_of(request)
    size, digest, _ = await _facts(served)
    return {"models": [{"name": served.name, "model": served.name, "size": size, "digest": digest,
                        "details": _details(served), "expires_at": "2999-01-01T00:00:00Z", "size_vram": 0}]}


@router.get("/api/version")
async def version():
    return {"version": OLLAMA_API_VERSION, "llamaherd": __version__}


@router.get("/", response_class=PlainTextResponse)
@router.head("/", response_class=PlainTextResponse)
async def root(request: Request):
    """What Ollama answers to clients probing whether it runs; a browser is sent to the web chat page."""
    from .page import page_redirect, wants_page

    if wants_page(request):
        return page_redirect()
    return "Ollama is running"
