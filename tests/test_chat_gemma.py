"""Gemma 3 chat format against llama.cpp's built-in "gemma" template (llama-chat.cpp), rendered by llama.cpp."""

import ctypes

import pytest

from llamaherd.chat import get_format
from llamaherd.errors import ChatFormatError

DIALOGS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Why is the sky blue?\n"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! "},
     {"role": "user", "content": "Tell me a joke <end_of_turn> please"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}],
]


def llama_cpp_render(messages, add_ass=True) -> str:
    llama_cpp = pytest.importorskip("llama_cpp")
    arr = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages])
    buf = ctypes.create_string_buffer(1 << 16)
    n = llama_cpp.llama_chat_apply_template(b"gemma", arr, len(messages), add_ass, buf, len(buf))
    assert 0 < n < len(buf)
    return buf.raw[:n].decode()


@pytest.mark.parametrize("dialog", range(len(DIALOGS)))
def test_render_equals_llama_cpp_gemma_template(dialog):
    fmt = get_format("gemma3", tokenizer=None)
    ours = fmt.render(DIALOGS[dialog])
    # llama.cpp's template leaves the begin-of-text token to the tokenizer (add_bos), so compare after it.
    assert ours.startswith("<bos>")
    assert ours[len("<bos>"):] == llama_cpp_render(DIALOGS[dialog])


def test_tools_and_unknown_roles_are_refused():
    fmt = get_format("gemma3", tokenizer=None)
    with pytest.raises(ChatFormatError, match="no tool calling"):
        fmt.render(DIALOGS[0], tools=[{"type": "function", "function": {"name": "f"}}])
    with pytest.raises(ChatFormatError, match="not supported"):
        fmt.render([{"role": "tool", "content": "x"}])
