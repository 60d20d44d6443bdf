"""The chat-format contract: OpenAI-shaped messages -> pieces (special or text) -> string or token ids.

Every format builds a list of `Segment`s. `render` joins them into a string; `encode_dialog` encodes each
text piece on its own with the tokenizer's plain `encode` (so special-token literals a user typed stay
plain text) and maps each special piece to its id. Encoding piece by piece also reproduces the token
boundaries of Meta's `ChatFormat`, which encodes header, role and content separately.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable

from ..errors import ChatFormatError
from .tools import NO_TOOLS, ToolCallParser, ToolSyntax, parse_tool_output

ROLES = ("system", "user", "assistant", "tool", "ipython")


@dataclass(frozen=True)
class Segment:
    """One run of the prompt: a special token (by its literal) or plain text."""

    text: str
    special: bool = False


def S(literal: str) -> Segment:
    return Segment(literal, True)


def T(text: str) -> Segment:
    return Segment(text, False)


# ---------------------------------------------------------------------------------------------------------
# Message normalisation
# ---------------------------------------------------------------------------------------------------------


def content_parts(message: dict, index: int) -> list[str]:
    """A message's content as text parts: str, None, a list of text parts, or (tool results) JSON data.

    Parts stay separate because Meta's encoder tokenizes each `RawTextItem` on its own.
    """
    content = message.get("content")
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                out.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ChatFormatError(
                    f"messages[{index}].content: part of type {kind!r} is not supported; "
                    "only text parts ({'type': 'text', 'text': ...}) can be rendered"
                )
        return out
    if isinstance(content, dict) and message.get("role") in ("tool", "ipython"):
        return [json.dumps(content)]
    raise ChatFormatError(
        f"messages[{index}].content must be a string, null or a list of text parts, got {type(content).__name__}"
    )


def content_pieces(message: dict, index: int, image_segments=None) -> list[Segment]:
    """A message's content as segments: text parts as text, image parts (`image_url` / `image`) as the segments
    the format's `image_segments(part)` gives (Meta's `_encode_content`: Llama 3 one vision token, Llama 4 the
    image's tile layout); a format without `image_segments` takes no images."""
    content = message.get("content")
    if not isinstance(content, list):
        return [T(part) for part in content_parts(message, index)]
    out: list[Segment] = []
    for part in content:
        if isinstance(part, dict) and part.get("type") in ("image_url", "image"):
            if image_segments is None:
                raise ChatFormatError(f"messages[{index}].content has an image part, which is not accepted here: "
                                      "the model reads no images, or this route does not take images yet")
            out += image_segments(part)
        else:
            out += [T(text) for text in content_parts({"content": [part]}, index)]
    return out


def content_text(message: dict, index: int) -> str:
    """A message's content as one string."""
    return "".join(content_parts(message, index))


def tool_calls_of(message: dict, index: int) -> list[tuple[str, dict]]:
    """[(name, arguments dict)] from an OpenAI-shaped assistant message's `tool_calls`."""
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise ChatFormatError(f"messages[{index}].tool_calls must be a list of tool calls")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name:
            raise ChatFormatError(
                f"messages[{index}].tool_calls[{j}]: expected {{'type': 'function', 'function': "
                "{'name': str, 'arguments': str|dict}}"
            )
        args = fn.get("arguments", fn.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError as exc:
                raise ChatFormatError(
                    f"messages[{index}].tool_calls[{j}].function.arguments is not valid JSON ({exc}); "
                    "pass a JSON object string or a dict"
                ) from None
        if not isinstance(args, dict):
            raise ChatFormatError(f"messages[{index}].tool_calls[{j}].function.arguments must be a JSON object")
        out.append((name, args))
    return out


def check_messages(messages) -> list[dict]:
    if not isinstance(messages, (list, tuple)):
        raise ChatFormatError(f"messages must be a list of dicts with 'role' and 'content', got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatFormatError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        if m.get("role") not in ROLES:
            raise ChatFormatError(f"messages[{i}].role is {m.get('role')!r}; expected one of {', '.join(ROLES)}")
    return list(messages)


# ---------------------------------------------------------------------------------------------------------
# Base format
# ---------------------------------------------------------------------------------------------------------


class ChatFormat:
    """A model family's chat format. Subclasses implement `pieces` and set `syntax` / stop literals."""

    name = "base"
    syntax: ToolSyntax = NO_TOOLS
    stop_literals: tuple[str, ...] = ()

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    # -- to implement ------------------------------------------------------------------------------------
    def pieces(self, messages: list[dict], tools: list | None = None, add_generation_prompt: bool = True) -> list[Segment]:
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------------------
    def render(self, messages, tools=None, add_generation_prompt: bool = True) -> str:
        """The prompt as text, special tokens written as their literals."""
        return "".join(p.text for p in self.pieces(check_messages(messages), tools, add_generation_prompt))

    def encode_dialog(self, messages, tools=None, add_generation_prompt: bool = True) -> list[int]:
        """The prompt as token ids."""
        return self.encode_pieces(self.pieces(check_messages(messages), tools, add_generation_prompt))

    def encode_pieces(self, pieces: Iterable[Segment]) -> list[int]:
        ids: list[int] = []
        for p in pieces:
            if p.special:
                ids.append(self.special_id(p.text))
            elif p.text:
                ids.extend(self.tokenizer.encode(p.text, bos=False, eos=False))
        return ids

    def special_id(self, literal: str) -> int:
        try:
            return self.tokenizer.special_id(literal)
        except Exception as exc:  # the tokenizer's own error type; re-raise as a format mismatch
            raise ChatFormatError(
                f"the {self.name!r} chat format needs special token {literal!r}, which this tokenizer "
                f"({getattr(self.tokenizer, 'kind', '?')}) does not have; pick the format matching the model"
            ) from exc

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end the assistant's turn: the format's end tokens plus the tokenizer's own stop ids."""
        ids = set(getattr(self.tokenizer, "stop_ids", ()) or ())
        specials = getattr(self.tokenizer, "special_tokens", {}) or {}
        for lit in self.stop_literals:
            if lit in specials:
                ids.add(specials[lit])
        eos = getattr(self.tokenizer, "eos_id", None)
        if eos is not None:
            ids.add(eos)
        return frozenset(ids)

    def parse_assistant(self, text: str) -> dict:
        """Decoded assistant output (special tokens as literals) -> OpenAI-shaped assistant message.

        Returns {"role": "assistant", "content": str | None, "tool_calls": [...]} (`tool_calls` is [] when
        the model called no tool) plus "stop_reason" ("end_of_turn", "end_of_message" or None).
        """
        return parse_tool_output(text, self.syntax)

    def stream_parser(self) -> ToolCallParser:
        """A streaming tool-call parser for this format (see `ToolCallParser`)."""
        return ToolCallParser(self.syntax)
