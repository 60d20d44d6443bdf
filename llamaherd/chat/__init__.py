"""Chat formats per Llama family (messages -> prompt tokens) and tool calls (definitions in, calls out).

`get_format(name, tokenizer, template=None, **options)` returns a `ChatFormat` with
`encode_dialog(messages, tools=None, add_generation_prompt=True) -> list[int]`, `render(...) -> str`,
`parse_assistant(text) -> dict`, `stop_ids` and `stream_parser()`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ChatFormatError
from .base import ChatFormat, Segment
from .tools import ToolCallParser, ToolSyntax, parse_tool_output

FORMATS = ("llama2", "llama3", "llama3.2", "llama4", "gemma3", "hf")
# One line per format, for `--help` texts and error messages.
FORMAT_HELP = {
    "llama2": "Llama 2 / Code Llama [INST] ... [/INST]",
    "llama3": "Llama 3, 3.1, 3.3 headers, JSON tool calls (also 'llama3.1', 'llama3.3')",
    "llama3.2": "Llama 3 headers with pythonic tool calls (Llama 3.2)",
    "llama4": "Llama 4 headers, pythonic tool calls",
    "gemma3": "Gemma 3 <start_of_turn> turns, no tools",
    "hf": "the checkpoint's own Jinja chat_template, rendered in a sandbox",
}


@dataclass(frozen=True)
class FormatChoice:
    """Which chat format a checkpoint speaks and why.

    `builtin` is True when the name was inferred from the architecture or vocabulary of a checkpoint that
    carries no chat template (as llama.cpp falls back to a built-in template); `reason` says so in one line.
    `completes` is True for a checkpoint that is most likely a pretrained (base) model: an architecture whose
    instruction-tuned releases always carry their template (Gemma 3) but that carries none. Such a model
    completes plain prompts (`herd run`, Ollama's /api/generate) and chats only where chat is asked for.
    """

    name: str
    builtin: bool = False
    reason: str = ""
    completes: bool = False


def choose_format(arch: str, tokenizer, template: str | None = None, explicit: str | None = None) -> FormatChoice:
    """The chat format for a checkpoint: explicit metadata, Llama 3/4 header tokens, its own template, then a
    built-in format from its architecture and vocabulary (Gemma 3 -> gemma3, SentencePiece Llama -> llama2).

    Llama 3 and 4 are recognised by their header tokens first: their native formats carry Meta's tool-call
    conventions, which a Jinja template renders less exactly. The fallback order follows llama.cpp, which uses
    the GGUF's template when there is one and otherwise a template built in for the architecture
    (llama.cpp src/llama-chat.cpp, `llm_chat_detect_template`).
    """
    if explicit:
        if explicit not in FORMATS and explicit not in ("llama3.1", "llama3.3"):
            raise ChatFormatError(f"unknown chat format {explicit!r}; expected one of {', '.join(FORMATS)}")
        return FormatChoice(str(explicit))
    specials = set(getattr(tokenizer, "special_tokens", {}) or {})
    if "<|header_start|>" in specials:
        return FormatChoice("llama4")
    if "<|start_header_id|>" in specials:
        return FormatChoice("llama3")
    if template:
        return FormatChoice("hf")
    if arch == "gemma3" and {"<start_of_turn>", "<end_of_turn>"} <= specials:
        return FormatChoice("gemma3", builtin=True, completes=True,
                            reason="no chat template in the checkpoint: using the built-in gemma3 format")
    from ..tokenizer.gguf_vocab import SPMVocab  # a GGUF's SentencePiece-style vocabulary

    spm = getattr(tokenizer, "kind", None) == "sentencepiece" or isinstance(tokenizer, SPMVocab)
    if arch == "llama" and spm:
        return FormatChoice("llama2", builtin=True,
                            reason="no chat template in the checkpoint: using the built-in llama2 format")
    raise ChatFormatError(
        "cannot tell this checkpoint's chat format (no chat_template, and an architecture/vocabulary with no "
        f"built-in format); name one with --chat-format (one of {', '.join(FORMATS[:-1])}), or complete a "
        "prompt you format yourself")


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


__all__ = ["ChatFormat", "ChatFormatError", "FORMATS", "FORMAT_HELP", "FormatChoice", "Segment", "ToolCallParser",
           "ToolSyntax", "choose_format", "get_format", "parse_tool_output"]
