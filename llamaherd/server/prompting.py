"""From API requests to engine inputs: sampling parameters and tool-call messages in both APIs' shapes."""

from __future__ import annotations

import json
import uuid
from typing import Any

from ..engine.sampling import SamplingParams


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
