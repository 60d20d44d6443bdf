"""From API requests to engine inputs: sampling parameters, tool-call messages and images in both APIs' shapes."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from typing import Any

from ..engine.sampling import SamplingParams
from .http import APIError


def sampling_params(defaults, **fields: Any) -> SamplingParams:
    """SamplingParams over the checkpoint's defaults; None means "not given"."""
    if fields.get("top_k") == -1:  # vLLM's "no top-k"
        fields["top_k"] = 0
    if fields.get("logit_bias"):
        fields["logit_bias"] = {int(k): v for k, v in fields["logit_bias"].items()}
    return SamplingParams.from_kwargs(defaults, **{k: v for k, v in fields.items() if v is not None})


def openai_tool_calls(message: dict) -> list[dict] | None:
    """Parsed tool calls as OpenAI returns them: ids, type "function", arguments as a JSON string."""
    calls = message.get("tool_calls") or []
    out = []
    for call in calls:
        fn = call.get("function", call)
        args = fn.get("arguments", {})
        out.append({
            "id": call.get("id") or f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": fn.get("name", ""), "arguments": args if isinstance(args, str) else json.dumps(args)},
        })
    return out or None


def ollama_tool_calls(message: dict) -> list[dict] | None:
    """Parsed tool calls as Ollama returns them: arguments as an object."""
    out = []
    for call in message.get("tool_calls") or []:
        fn = call.get("function", call)
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                args = {"value": args}
        out.append({"function": {"name": fn.get("name", ""), "arguments": args}})
    return out or None


def messages_for_format(messages: list[dict]) -> list[dict]:
    """OpenAI/Ollama request messages as the chat formats take them ("developer" is OpenAI's new "system")."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        if m.get("role") == "developer":
            m["role"] = "system"
        for call in m.get("tool_calls") or []:
            fn = call.get("function") or {}
            if isinstance(fn.get("arguments"), str):
                try:
                    fn["arguments"] = json.loads(fn["arguments"])
                except ValueError:
                    pass
        out.append(m)
    return out


def openai_images(messages: list[dict]) -> list[bytes]:
    """The image bytes of OpenAI request messages, in prompt order: `image_url` parts carrying the image inline as
    a data:image/...;base64, URL. The server reads nothing else: a remote http(s) URL is refused (it fetches
    nothing), and so are local paths and other part types that name an image (they would read the server's own
    files)."""
    from ..image import data_url_bytes

    out = []
    for m in messages:
        content = m.get("content")
        for part in content if isinstance(content, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                raise APIError(400, "content part type 'image' is not accepted here; send {'type': 'image_url', "
                               "'image_url': {'url': 'data:image/png;base64,...'}}", param="messages")
            if kind != "image_url":
                continue
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise APIError(400, "an image_url part needs {'image_url': {'url': 'data:image/...;base64,...'}}",
                               param="messages")
            if url.split(":", 1)[0].lower() in ("http", "https"):
                raise APIError(400, "remote image URLs are refused: this server fetches nothing; send the image "
                               "inline as a data:image/...;base64,... URL", param="messages")
            data = data_url_bytes(url)  # malformed base64: ImageError, a 400
            if data is None:
                raise APIError(400, "an image_url must be a data:image/...;base64,... URL (the server reads no "
                               "files)", param="messages")
            out.append(data)
    return out


def ollama_images(images: list[str] | None, field: str = "images") -> list[dict]:
    """Ollama's `images` (base64 image data) as image content parts, placed before the message's text as
    Ollama does; malformed base64 is a 400."""
    parts = []
    for i, data in enumerate(images or ()):
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{field}[{i}] is not base64 image data; send the image file's bytes base64-encoded",
                           param=field) from None
        parts.append({"type": "image", "image": raw})
    return parts
