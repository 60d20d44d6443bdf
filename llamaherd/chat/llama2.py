"""Llama 2 chat format: `<s>[INST] <<SYS>>\\n...\\n<</SYS>>\\n\\n user [/INST] answer </s>`, per Meta's rules.

Rules from Meta's llama (v2) `llama/generation.py::Llama.chat_completion`:
* a leading system message is folded into the first user turn as `<<SYS>>\\n{system}\\n<</SYS>>\\n\\n`;
* the dialog must alternate user/assistant, starting (after the system message) with the user;
* each (user, answer) pair is encoded as one string `f"[INST] {user.strip()} [/INST] {answer.strip()} "`
  with bos and eos; the final user turn as `f"[INST] {user.strip()} [/INST]"` with bos only;
* Meta refuses content holding the tags `[INST]`, `[/INST]`, `<<SYS>>`, `<</SYS>>`: we raise ChatFormatError.
"""

from __future__ import annotations

from ..errors import ChatFormatError
from .base import ChatFormat, Segment, S, T, content_text
from .tools import LLAMA2_SYNTAX

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
BOS, EOS = "<s>", "</s>"


class Llama2Format(ChatFormat):
    """Llama 2 chat models (and Code Llama instruct, which uses the same tags)."""

    name = "llama2"
    syntax = LLAMA2_SYNTAX
    stop_literals = (EOS,)

    def pieces(self, messages, tools=None, add_generation_prompt=True) -> list[Segment]:
        if tools:
            raise ChatFormatError("the llama2 chat format has no tool calling; drop `tools` or use a Llama 3/4 format")
        texts = []
        for i, m in enumerate(messages):
            if m["role"] not in ("system", "user", "assistant"):
                raise ChatFormatError(f"messages[{i}].role {m['role']!r} is not supported by the llama2 format "
                                      "(system, user and assistant only)")
            if m.get("tool_calls"):
                raise ChatFormatError(f"messages[{i}] has tool_calls, which the llama2 format cannot express")
            text = content_text(m, i)
            for tag in SPECIAL_TAGS:
                if tag in text:
                    raise ChatFormatError(
                        f"messages[{i}].content contains the Llama 2 tag {tag!r}; Meta's chat_completion refuses "
                        "special tags in the prompt: remove it"
                    )
            texts.append((m["role"], text))
        if texts and texts[0][0] == "system":
            if len(texts) < 2:
                raise ChatFormatError("a llama2 dialog needs a user message after the system message")
            texts = [(texts[1][0], B_SYS + texts[0][1] + E_SYS + texts[1][1])] + texts[2:]
        for k, (role, _) in enumerate(texts):
            want = "user" if k % 2 == 0 else "assistant"
            if role != want:
                raise ChatFormatError(
                    f"llama2 dialogs alternate user/assistant starting with user (an optional system message "
                    f"first); turn {k} is {role!r}, expected {want!r}"
                )
        out: list[Segment] = []
        for (_, prompt), (_, answer) in zip(texts[::2], texts[1::2]):
            out += [S(BOS), T(f"{B_INST} {prompt.strip()} {E_INST} {answer.strip()} "), S(EOS)]
        if len(texts) % 2 == 1:
            out += [S(BOS), T(f"{B_INST} {texts[-1][1].strip()} {E_INST}")]
        elif add_generation_prompt:
            raise ChatFormatError("a llama2 prompt must end with a user message (Meta's chat_completion rule)")
        return out

    def special_id(self, literal: str) -> int:
        tok_id = {BOS: getattr(self.tokenizer, "bos_id", None), EOS: getattr(self.tokenizer, "eos_id", None)}[literal]
        if tok_id is None:
            raise ChatFormatError(f"the llama2 chat format needs {literal!r} but this tokenizer has no such id")
        return tok_id
