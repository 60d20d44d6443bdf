"""Llama 3.x chat format: `<|start_header_id|>role<|end_header_id|>\\n\\n content <|eot_id|>`, ipython tools.

Follows llama-models `llama3/chat_format.py::ChatFormat.encode_message` piece for piece (header, role,
"\\n\\n", content, each tool call encoded separately, end token), so token ids match Meta's encoder.
Two choices where Meta's sources disagree, both documented in the tests:
* `<|python_tag|>` opens every built-in tool call (brave_search, wolfram_alpha, code_interpreter), as
  `llama3_1/prompt_format.md` and the Hugging Face template write them; Meta's encoder adds it only
  before code_interpreter.
* An OpenAI message carries no stop reason, so a past call ends with `<|eom_id|>` when it called a
  built-in tool (the documented "wait for the tool" token) and `<|eot_id|>` for custom tools
  (`llama3_2/text_prompt_format.md`). A message may set "stop_reason" ("end_of_message" or
  "end_of_turn", as `parse_assistant` returns it) to override.
"""

from __future__ import annotations

from ..errors import ChatFormatError
from .base import ChatFormat, Segment, S, T, content_pieces, content_text, tool_calls_of
from .tool_prompts import (
    TOOL_FORMATS,
    encode_call,
    function_tag_user,
    ipython_system,
    json_tools_user,
    pythonic_call,
    pythonic_system,
    split_tools,
    today_string,
)
from .tools import BUILTIN_TOOLS, LLAMA3_SYNTAX


class HeaderChatFormat(ChatFormat):
    """Shared shape of Llama 3 and Llama 4: bos, then header/content/end per message."""

    BOS = "<|begin_of_text|>"
    HEADER_START = "<|start_header_id|>"
    HEADER_END = "<|end_header_id|>"
    EOT = "<|eot_id|>"
    EOM = "<|eom_id|>"
    takes_images = False  # formats that render image parts define image_segments
    default_tool_format = "json"

    def __init__(self, tokenizer, tool_format: str | None = None, today=None, images: bool = False) -> None:
        super().__init__(tokenizer)
        # Image parts render only where the caller binds the images to the model (Model.chat of a vision model);
        # elsewhere they are refused rather than rendered into a prompt that would run without them.
        if images and not self.takes_images:
            raise ChatFormatError(f"the {self.name!r} chat format renders no images")
        self.images = images
        self.tool_format = tool_format or self.default_tool_format
        if self.tool_format not in TOOL_FORMATS:
            raise ChatFormatError(f"unknown tool_format {self.tool_format!r}; expected one of {', '.join(TOOL_FORMATS)}")
        self.today = today  # None: the current date when rendering; a str or date pins it (tests, caching)

    # -- pieces ------------------------------------------------------------------------------------------
    def header(self, role: str) -> list[Segment]:
        return [S(self.HEADER_START), T("ipython" if role in ("tool", "ipython") else role), S(self.HEADER_END), T("\n\n")]

    def pieces(self, messages, tools=None, add_generation_prompt=True) -> list[Segment]:
        out = [S(self.BOS)]
        for index, m in self.with_tool_prompts(messages, tools):
            out += self.message_pieces(m, index)
        if add_generation_prompt:
            out += self.header("assistant")
        return out

    def message_pieces(self, m: dict, index: int) -> list[Segment]:
        role = m["role"]
        out = self.header(role)
        calls = tool_calls_of(m, index) if role == "assistant" else []
        out += self.call_prefix(calls)
        out += content_pieces(m, index, self.image_segments if self.images else None)
        if self.tool_format == "python_list" and len(calls) > 1 and not any(n in BUILTIN_TOOLS for n, _ in calls):
            # Several pythonic calls are one list, as the model writes them: [f(a=1), g(b=2)].
            out.append(T("[" + ", ".join(pythonic_call(n, a) for n, a in calls) + "]"))
        else:
            out += [T(encode_call(n, a, self.tool_format)) for n, a in calls]
        out += self.call_suffix(calls)
        out.append(S(self.end_token(m, calls)))
        return out

    def call_prefix(self, calls) -> list[Segment]:
        return []

    def call_suffix(self, calls) -> list[Segment]:
        return []

    def end_token(self, m: dict, calls) -> str:
        reason = m.get("stop_reason")
        if m["role"] == "assistant" and reason in ("end_of_message", "end_of_turn"):
            return self.EOM if reason == "end_of_message" else self.EOT
        return self.EOT

    # -- tool definitions --------------------------------------------------------------------------------
    def with_tool_prompts(self, messages: list[dict], tools) -> list[tuple[int, dict]]:
        """The dialog with tool definitions added as Meta documents them; pairs keep original indices."""
        indexed = list(enumerate(messages))
        builtins, custom = split_tools(tools)
        if not builtins and not custom:
            return indexed
        system_text = ""
        if indexed and indexed[0][1]["role"] == "system":
            system_text = content_text(indexed[0][1], 0)
            indexed = indexed[1:]
        today = today_string(self.today)
        if self.tool_format == "python_list":
            text = pythonic_system(custom, system_text) if custom else system_text
            if builtins:
                text = ipython_system(builtins, today, text)
            return [(0, {"role": "system", "content": text})] + indexed
        system = (0, {"role": "system", "content": ipython_system(builtins, today, system_text)})
        if custom:
            instructions = json_tools_user(custom) if self.tool_format == "json" else function_tag_user(custom)
            first_user = next((k for k, (_, m) in enumerate(indexed) if m["role"] == "user"), len(indexed))
            indexed.insert(first_user, (0, {"role": "user", "content": instructions}))
        return [system] + indexed


class Llama3Format(HeaderChatFormat):
    """Llama 3, 3.1, 3.2, 3.3 instruct models."""

    name = "llama3"
    PYTHON_TAG = "<|python_tag|>"
    takes_images = True

    def image_segments(self, part) -> list[Segment]:
        """One <|image|> per image: Llama 3.2 Vision (llama-models llama3/chat_format.py `vision_token`)."""
        return [S("<|image|>")]
    syntax = LLAMA3_SYNTAX
    stop_literals = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")

    def call_prefix(self, calls) -> list[Segment]:
        return [S(self.PYTHON_TAG)] if calls and calls[0][0] in BUILTIN_TOOLS else []

    def end_token(self, m: dict, calls) -> str:
        if m.get("stop_reason") is None and any(n in BUILTIN_TOOLS for n, _ in calls):
            return self.EOM
        return super().end_token(m, calls)
