"""Chat formats per Llama family (messages -> prompt tokens) and tool calls (definitions in, calls out).

`get_format(name, tokenizer, template=None, **options)` returns a `ChatFormat` with
`encode_dialog(messages, tools=None, add_generation_prompt=True) -> list[int]`, `render(...) -> str`,
`parse_assistant(text) -> dict`, `stop_ids` and `stream_parser()`.
"""

from __future__ import annotations

from ..errors import ChatFormatError
from .base import ChatFormat, Piece
from .tools import ToolCallParser, ToolSyntax, parse_tool_output

FORMATS = ("llama2", "llama3", "llama3.2", "llama4", "gemma3", "hf")


def get_format(name: str, tokenizer, template: str | None = None, **options) -> ChatFormat:
    """The chat format `name` for `tokenizer`.

    name: "llama2" (`[INST]`), "llama3" (Llama 3/3.1/3.3, JSON tool calls), "llama3.2" (Llama 3 headers with
    pythonic tool calls), "llama4", "gemma3", or "hf" (the checkpoint's Jinja `template`, rendered in a sandbox).
    options: `tool_format` ("json", "function_tag", "python_list") and `today` (date in tool system
    prompts) for the Llama 3/4 formats.
    """
    if name == "llama3" or name in ("llama3.1", "llama3.3"):
        from .llama3 import Llama3Format

        return Llama3Format(tokenizer, **options)
    if name == "llama3.2":
        from .llama3 import Llama3Format

        return Llama3Format(tokenizer, **{"tool_format": "python_list", **options})
    if name == "llama4":
        from .llama4 import Llama4Format

        return Llama4Format(tokenizer, **options)
    if name == "llama2":
        from .llama2 import Llama2Format

        return Llama2Format(tokenizer, **options)
    if name == "gemma3":
        from .gemma import GemmaFormat

        return GemmaFormat(tokenizer, **options)
    if name == "hf":
        if not template:
            raise ChatFormatError("the 'hf' chat format needs the checkpoint's chat_template (template=...)")
        from .hf_template import HFTemplateFormat

        return HFTemplateFormat(tokenizer, template, **options)
    raise ChatFormatError(f"unknown chat format {name!r}; expected one of {', '.join(FORMATS)}")


__all__ = ["ChatFormat", "ChatFormatError", "FORMATS", "Piece", "ToolCallParser", "ToolSyntax", "get_format",
           "parse_tool_output"]
