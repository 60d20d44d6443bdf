"""Shared helpers for the chat tests: tokenizers, Meta reference objects built from OpenAI-shaped dicts."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

from llama_models.datatypes import BuiltinTool, RawMessage, StopReason, ToolCall

DATA = Path(__file__).parent / "chat_data"
LLAMA31_TEMPLATE = (DATA / "llama31_chat_template.jinja").read_text()
# The official Llama 2 chat template (meta-llama/Llama-2-7b-chat-hf tokenizer_config.json), found via search.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
BUILTINS = {"brave_search", "wolfram_alpha", "photogen", "code_interpreter"}


@functools.cache
def ours(name: str):
    from llamaherd.tokenizer import Tokenizer

    return Tokenizer.llama3() if name == "llama3" else Tokenizer.llama4()


@functools.cache
def reference_format(name: str):
    if name == "llama3":
        from llama_models.llama3.chat_format import ChatFormat
        from llama_models.llama3.tokenizer import Tokenizer

        return ChatFormat(Tokenizer.get_instance())
    added = _stub_torchvision()
    before = set(sys.modules)
    try:
        from llama_models.llama4.chat_format import ChatFormat
        from llama_models.llama4.tokenizer import Tokenizer
    finally:  # the stand-in must not leak: transformers probes for torchvision, and the vision tests need
        if added:  # llama-models' image code bound to the real one, so its modules are imported afresh there
            for name in added + [m for m in set(sys.modules) - before if m.startswith("llama_models.")]:
                sys.modules.pop(name, None)

    return ChatFormat(Tokenizer.get_instance())


def _stub_torchvision() -> list[str]:
    """llama-models' Llama 4 ChatFormat imports torchvision for image preprocessing only; torchvision is not
    installed (no wheel matching this torch). Text-only encoding never touches it, so an empty stand-in module
    lets the reference import; any image use would fail loudly with AttributeError."""
    import importlib.util
    import types

    if importlib.util.find_spec("torchvision") is not None:
        return []
    from .vision_fixtures import VISION_EXTRA, import_torchvision

    if VISION_EXTRA.is_dir():  # the real one (make install-test puts it there), imported as the vision tests do
        import_torchvision()
        return []
    tv = types.ModuleType("torchvision")
    tv.transforms = types.ModuleType("torchvision.transforms")
    tv.transforms.functional = types.ModuleType("torchvision.transforms.functional")
    mods = {"torchvision": tv, "torchvision.transforms": tv.transforms,
            "torchvision.transforms.functional": tv.transforms.functional}
    sys.modules.update(mods)
    return list(mods)


def to_raw(messages: list[dict]) -> list[RawMessage]:
    """Meta's RawMessage objects from the same OpenAI-shaped dicts the test feeds our format."""
    out = []
    for m in messages:
        role = "tool" if m["role"] in ("tool", "ipython") else m["role"]
        calls = []
        for c in m.get("tool_calls") or []:
            fn = c["function"]
            args = fn["arguments"] if isinstance(fn["arguments"], dict) else json.loads(fn["arguments"])
            name = BuiltinTool[fn["name"]] if fn["name"] in BUILTINS else fn["name"]
            calls.append(ToolCall(call_id=c.get("id", "x"), tool_name=name, arguments=args))
        kw = {}
        if role == "assistant":
            builtin = any(c["function"]["name"] in BUILTINS for c in m.get("tool_calls") or [])
            kw["stop_reason"] = StopReason.end_of_message if builtin else StopReason.end_of_turn
        out.append(RawMessage(role=role, content=m.get("content") or "", tool_calls=calls, **kw))
    return out


def call(name: str, **args) -> dict:
    return {"id": f"call_{name}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def tiny_hf_tokenizer_json(tmp_path: Path, specials: list[str]) -> Path:
    """A byte-level BPE tokenizer.json (256 byte tokens, no merges) with the given special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path
