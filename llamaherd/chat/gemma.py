"""Gemma 3 chat format: `<bos><start_of_turn>user\\n...<end_of_turn>\\n<start_of_turn>model\\n`.

Rules of Google's Gemma 3 chat template (tokenizer_config.json of google/gemma-3-*-it), which llama.cpp also
builds in as its "gemma" template (llama-chat.cpp): a leading system message is prepended to the first user
turn followed by a blank line; the assistant's role is written `model`; every content is stripped of
surrounding whitespace; each turn ends with `<end_of_turn>` and a newline.
"""

from __future__ import annotations

from ..errors import ChatFormatError
from .base import ChatFormat, Segment, S, T, content_text

START, END = "<start_of_turn>", "<end_of_turn>"


class GemmaFormat(ChatFormat):
    name = "gemma3"
    stop_literals = (END, "<eos>")

    def pieces(self, messages, tools=None, add_generation_prompt=True) -> list[Segment]:
        if tools:
            raise ChatFormatError("the gemma3 chat format has no tool calling; drop `tools`")
        turns = []
        for i, m in enumerate(messages):
            if m["role"] not in ("system", "user", "assistant"):
                raise ChatFormatError(f"messages[{i}].role {m['role']!r} is not supported by the gemma3 format "
                                      "(system, user and assistant only)")
            turns.append((m["role"], content_text(m, i).strip()))
        system = turns.pop(0)[1] if turns and turns[0][0] == "system" else None
        out: list[Segment] = [S("<bos>")]
        for k, (role, text) in enumerate(turns):
            if role == "system":
                raise ChatFormatError("gemma3 takes one system message, first in the dialog")
            if k == 0 and system is not None:
                text = f"{system}\n\n{text}"
            out += [S(START), T(("model" if role == "assistant" else "user") + "\n" + text), S(END), T("\n")]
        if add_generation_prompt:
            out += [S(START), T("model\n")]
        return out

    def special_id(self, literal: str) -> int:
        if literal == "<bos>" and getattr(self.tokenizer, "bos_id", None) is not None:
            return self.tokenizer.bos_id
        return super().special_id(literal)
