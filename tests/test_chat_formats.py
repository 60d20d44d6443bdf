"""Llama 3 / Llama 4 / Llama 2 chat formats against Meta's encoder, Meta's documented prompts and HF's Llama 2 template."""

from __future__ import annotations

import re
from pathlib import Path

import llama_models
import pytest

from llamaherd.chat import get_format
from llamaherd.errors import ChatFormatError

from .chat_fixtures import LLAMA2_TEMPLATE, call, ours, reference_format, tiny_hf_tokenizer_json, to_raw

DOCS = Path(llama_models.__file__).parent

DIALOGS = {
    "plain": [
        {"role": "system", "content": "You are a helpful assistant"},
        {"role": "user", "content": "Answer who are you in the form of jeopardy?"},
    ],
    "multi_turn": [
        {"role": "system", "content": "Be brief.\n"},
        {"role": "user", "content": "Hi there! 😀 Ça va?"},
        {"role": "assistant", "content": "  Hello — fine.  "},
        {"role": "user", "content": [{"type": "text", "text": "two "}, {"type": "text", "text": "parts\n\n"}]},
    ],
    "custom_tool_round_trip": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [call("get_weather", city="Paris", days=3, metric=True)]},
        {"role": "tool", "tool_call_id": "call_get_weather", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "It is 21 C."},
        {"role": "user", "content": "And nested?"},
        {"role": "assistant", "content": "", "tool_calls": [call("lookup", q={"a": 2.5}, tags=["x", None, 3])]},
        {"role": "tool", "content": "ok"},
    ],
    "code_interpreter": [
        {"role": "user", "content": "Is 7 prime? Use code."},
        {"role": "assistant", "content": None,
         "tool_calls": [call("code_interpreter", code="def p(n):\n    return all(n % i for i in range(2, n))\nprint(p(7))")]},
        {"role": "ipython", "content": "True"},
    ],
}


@pytest.mark.parametrize("family", ["llama3", "llama4"])
@pytest.mark.parametrize("dialog", sorted(DIALOGS))
@pytest.mark.parametrize("tool_format", ["json", "function_tag", "python_list"])
def test_encode_dialog_matches_llama_models(family, dialog, tool_format):
    messages = DIALOGS[dialog]
    from llama_models.datatypes import ToolPromptFormat

    ref = reference_format(family).encode_dialog_prompt(to_raw(messages), ToolPromptFormat[tool_format]).tokens
    fmt = get_format(family, ours(family), tool_format=tool_format)
    got = fmt.encode_dialog(messages)
    if dialog == "custom_tool_round_trip" and tool_format == "python_list":
        # Known reference defect: `format_value` writes dicts as `{a=2.5}`, not a Python literal;
        # we write `{"a": 2.5}` so the model sees parseable syntax. Everything else must match.
        r_text, o_text = ours(family).decode(ref), ours(family).decode(got)
        assert o_text.replace('{"a": ', "{a=") == r_text
        return
    assert got == ref


def test_multi_turn_multi_part_content_round_trips_through_decode():
    fmt = get_format("llama3", ours("llama3"))
    text = fmt.render(DIALOGS["multi_turn"])
    assert ours("llama3").decode(fmt.encode_dialog(DIALOGS["multi_turn"])) == text
    assert "two parts\n\n<|eot_id|>" in text


@pytest.mark.parametrize("family,literal", [("llama3", "<|eot_id|>"), ("llama4", "<|eot|>")])
def test_special_literals_typed_by_users_stay_plain_text(family, literal):
    tok = ours(family)
    special = tok.special_id(literal)
    messages = [{"role": "user", "content": f"say {literal} and <|begin_of_text|>"}]
    ids = get_format(family, tok).encode_dialog(messages)
    ref = reference_format(family).encode_dialog_prompt(to_raw(messages)).tokens
    assert ids == ref
    assert ids.count(special) == 1  # only the real end of the user turn
    assert ids.count(tok.special_id("<|begin_of_text|>")) == 1


def test_llama3_builtin_call_writes_python_tag_as_documented():
    """Meta's prompt_format.md shows `<|python_tag|>brave_search.call(...)<|eom_id|>`; llama-models' encoder
    omits the tag for brave_search (it adds it only for code_interpreter). We follow the documented prompt."""
    messages = [{"role": "user", "content": "gold?"},
                {"role": "assistant", "content": None, "tool_calls": [call("brave_search", query="price of gold")]}]
    text = get_format("llama3", ours("llama3")).render(messages, add_generation_prompt=False)
    assert text.endswith('<|python_tag|>brave_search.call(query="price of gold")<|eom_id|>')
    ref = reference_format("llama3").encode_dialog_prompt(to_raw(messages)).tokens
    ref_text = ours("llama3").decode(ref)
    assert ref_text.replace('\n\nbrave_search', '\n\n<|python_tag|>brave_search') == \
        text + "<|start_header_id|>assistant<|end_header_id|>\n\n"


# ---- Meta's documented prompts (llama3_1/prompt_format.md, llama3_2/text_prompt_format.md) ------------------

def doc_prompts(relpath: str) -> list[str]:
    text = (DOCS / relpath).read_text()
    blocks = re.findall(r"##### Input Prompt Format\n```\n(.*?)\n```", text, flags=re.S)
    return blocks


def test_documented_plain_prompt():
    doc = doc_prompts("llama3_1/prompt_format.md")[1]
    got = get_format("llama3", ours("llama3")).render(DIALOGS["plain"])
    assert got == doc


def test_documented_builtin_tools_prompt():
    doc = doc_prompts("llama3_1/prompt_format.md")[2]
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Search the web for the latest price of 1oz gold?"}]
    fmt = get_format("llama3", ours("llama3"), today="21 September 2024")
    assert fmt.render(messages, tools=[{"type": "brave_search"}, {"type": "wolfram_alpha"}]) == doc


def test_documented_code_interpreter_prompt_llama32():
    doc = doc_prompts("llama3_2/text_prompt_format.md")[3]
    messages = [{"role": "user", "content": "Write code to check if number is prime. Use it to verify if number 7 is prime"}]
    fmt = get_format("llama3", ours("llama3"), today="24 September 2024")
    assert fmt.render(messages, tools=["code_interpreter"]) == doc


def test_documented_pythonic_tools_prompt_llama32():
    doc = doc_prompts("llama3_2/text_prompt_format.md")[1]
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Get weather info for places",
        "parameters": {"type": "dict", "required": ["city"], "properties": {
            "city": {"type": "string", "description": "The name of the city to get the weather for"},
            "metric": {"type": "string", "description": "The metric for weather. Options are: celsius, fahrenheit",
                       "default": "celsius"}}}}}]
    messages = [{"role": "user", "content": "What is the weather in SF and Seattle?"}]
    assert get_format("llama3.2", ours("llama3")).render(messages, tools=tools) == doc


def test_json_tools_go_in_a_user_message_after_the_ipython_system_prompt():
    tools = [{"type": "function", "function": {"name": "trending_songs", "description": "Returns the trending songs",
                                                "parameters": {"type": "object", "properties": {}}}}]
    fmt = get_format("llama3", ours("llama3"), today="21 September 2024")
    text = fmt.render([{"role": "system", "content": "You are a helpful assistant."},
                       {"role": "user", "content": "Use tools to get latest trending songs"}], tools=tools)
    doc = doc_prompts("llama3_1/prompt_format.md")[5]
    # Same system message and turn structure as the documented prompt; the JSON listing is ours (json.dumps).
    assert text.split("<|eot_id|>")[0] == doc.split("<|eot_id|>")[0]
    assert text.count("<|start_header_id|>user<|end_header_id|>") == 2
    assert "Return function calls in JSON format.<|eot_id|>" in text


def test_stop_ids():
    assert get_format("llama3", ours("llama3")).stop_ids >= {128001, 128008, 128009}
    t4 = ours("llama4")
    assert get_format("llama4", t4).stop_ids >= {t4.special_id("<|eot|>"), t4.special_id("<|eom|>")}


@pytest.mark.parametrize("bad,match", [
    ([{"role": "robot", "content": "x"}], "role"),
    # (image parts render as <|image|> in the Llama 3 format: tests/test_vision_chat.py)
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": "x"}]}], "input_audio"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}],
     "arguments"),
    ("hello", "list"),
])
def test_bad_messages_raise_chat_format_error(bad, match):
    with pytest.raises(ChatFormatError, match=match):
        get_format("llama3", ours("llama3")).encode_dialog(bad)


def test_unknown_format_and_bad_tools():
    with pytest.raises(ChatFormatError, match="llama3"):
        get_format("chatml", ours("llama3"))
    with pytest.raises(ChatFormatError, match="tools\\[0\\]"):
        get_format("llama3", ours("llama3")).render([{"role": "user", "content": "x"}], tools=[{"type": "nope"}])


# ---- Llama 2 against the official Llama-2-chat HF template rendered by transformers ---------------------------

LLAMA2_DIALOGS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": " Hi \n"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": " b "},
     {"role": "user", "content": "c"}],
]


@pytest.fixture(scope="module")
def llama2_pair(tmp_path_factory):
    from transformers import PreTrainedTokenizerFast

    from llamaherd.tokenizer import Tokenizer

    path = tiny_hf_tokenizer_json(tmp_path_factory.mktemp("l2"), ["<s>", "</s>"])
    ref = PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<s>", eos_token="</s>")
    ref.chat_template = LLAMA2_TEMPLATE
    return ref, Tokenizer.from_file(path)


@pytest.mark.parametrize("k", range(len(LLAMA2_DIALOGS)))
def test_llama2_matches_official_template(llama2_pair, k):
    ref, tok = llama2_pair
    messages = LLAMA2_DIALOGS[k]
    want = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert get_format("llama2", tok).render(messages) == want


def test_llama2_rules(llama2_pair):
    _, tok = llama2_pair
    fmt = get_format("llama2", tok)
    with pytest.raises(ChatFormatError, match="alternate"):
        fmt.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ChatFormatError, match=re.escape("[INST]")):
        fmt.render([{"role": "user", "content": "x [INST] y"}])
    with pytest.raises(ChatFormatError, match="tool"):
        fmt.render([{"role": "user", "content": "x"}], tools=[{"type": "brave_search"}])
    assert fmt.parse_assistant(" Bonjour </s>") == {"role": "assistant", "content": "Bonjour ", "tool_calls": [],
                                                     "stop_reason": "end_of_turn"}
