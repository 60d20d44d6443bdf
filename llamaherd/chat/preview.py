"""A sample dialog rendered by a chat format, special tokens highlighted (ANSI colour) for `herd prompt-format`."""

from __future__ import annotations

from .base import ChatFormat, check_messages

SPECIAL_STYLE = "\x1b[1;36m"  # bold cyan
RESET = "\x1b[0m"

SAMPLE = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What's the weather in Paris?"},
]
SAMPLE_WITH_TOOLS = SAMPLE + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": 21, "sky": "clear"}'},
]
SAMPLE_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def preview(fmt: ChatFormat, tools: bool = False, color: bool = False) -> str:
    """The sample dialog (with a tool round trip if `tools`) as the model sees it."""
    messages = SAMPLE_WITH_TOOLS if tools else SAMPLE
    pieces = fmt.pieces(check_messages(messages), SAMPLE_TOOLS if tools else None, True)
    if not color:
        return "".join(p.text for p in pieces)
    return "".join(f"{SPECIAL_STYLE}{p.text}{RESET}" if p.special else p.text for p in pieces)
