"""Past tool calls written back into the dialog, value type by value type, against llama-models' encoder."""

from __future__ import annotations

import json

import pytest
from llama_models.datatypes import BuiltinTool, ToolCall, ToolPromptFormat
from llama_models.llama3.tool_utils import ToolUtils, parse_python_list_for_function_calls

from llamaherd.chat import get_format
from llamaherd.chat.tool_prompts import encode_call, pythonic_call
from llamaherd.errors import ChatFormatError

from .chat_fixtures import call, ours, reference_format, to_raw

# One argument of every value type llama-models' `format_value` handles (and nestings of them).
VALUES = {
    "str": "Paris",
    "str_unicode": "Zürich — 東京",
    "str_empty": "",
    "int": 7,
    "int_negative": -3,
    "float": 2.5,
    "float_exponent": 1e-07,
    "true": True,
    "false": False,
    "none": None,
    "list": [1, "two", 3.0, None, True],
    "list_empty": [],
    "dict": {"x": 1, "y": "z"},
    "dict_empty": {},
    "dict_nested": {"a": [1, {"b": None}], "c": {"d": False}},
    "list_of_dicts": [{"k": "v"}, {"k": 2}],
}


def _reference(name, arguments: dict, fmt: str) -> str:
    # model_construct: the nested values above are outside ToolCall's declared RecursiveType, which the
    # encoder handles all the same (it recurses on lists and dicts).
    tool = BuiltinTool[name] if name in BuiltinTool.__members__ else name
    return ToolUtils.encode_tool_call(ToolCall.model_construct(call_id="x", tool_name=tool, arguments=arguments),
                                      ToolPromptFormat[fmt])


@pytest.mark.parametrize("fmt", ["python_list", "json", "function_tag"])
@pytest.mark.parametrize("kind", sorted(VALUES))
def test_each_value_type_matches_reference_encoder(kind, fmt):
    args = {"v": VALUES[kind]}
    assert encode_call("f", args, fmt) == _reference("f", args, fmt)


def test_several_arguments_in_order_match_reference_encoder():
    assert encode_call("f", VALUES, "python_list") == _reference("f", VALUES, "python_list")


@pytest.mark.parametrize("name", ["brave_search", "wolfram_alpha", "photogen"])
@pytest.mark.parametrize("query", ["latest price of gold", "Zürich", 42])
def test_builtin_query_matches_reference_encoder(name, query):
    assert encode_call(name, {"query": query}, "python_list") == _reference(name, {"query": query}, "python_list")


def test_code_interpreter_matches_reference_encoder():
    args = {"code": 'print("hi")\nx = {"a": 1}'}
    assert encode_call("code_interpreter", args, "json") == _reference("code_interpreter", args, "json")


@pytest.mark.parametrize("family", ["llama3", "llama4"])
def test_dialog_with_dict_argument_matches_reference_tokens(family):
    """End to end: the rendered prompt's token ids equal Meta's encode_dialog_prompt."""
    messages = [
        {"role": "user", "content": "Book it."},
        {"role": "assistant", "content": None,
         "tool_calls": [call("book", opts={"x": 1, "y": "z"}, seats=[1, 2], note=None, ok=True)]},
        {"role": "ipython", "content": "done"},
    ]
    ref = reference_format(family).encode_dialog_prompt(to_raw(messages), ToolPromptFormat.python_list).tokens
    got = get_format(family, ours(family), tool_format="python_list").encode_dialog(messages)
    assert got == ref


# --- literals="python": real Python literals, judged by the reference's own pythonic-call parser -------------

HARD_STRINGS = ['say "hi"', "back\\slash", "a\\nb", "two\nlines", "tab\tand 'single'", "Zürich"]


@pytest.mark.parametrize("kind", sorted(VALUES))
def test_python_literals_read_back_by_reference_parser(kind):
    args = {"v": VALUES[kind]}
    text = encode_call("f", args, "python_list", literals="python")
    assert parse_python_list_for_function_calls(text) == [("f", args)]


@pytest.mark.parametrize("s", HARD_STRINGS)
def test_python_literals_escape_strings(s):
    args = {"s": s, "d": {"k": s}}
    assert parse_python_list_for_function_calls(encode_call("f", args, "python_list", literals="python")) == \
        [("f", args)]


@pytest.mark.parametrize("args", [{"d": {"k": 1}}, {"s": 'say "hi"'}, {"s": "two\nlines"}])
def test_reference_style_does_not_parse_back(args):
    """Why the option exists: the reference's own rendering is not read back by the reference's own parser."""
    with pytest.raises(SyntaxError):
        parse_python_list_for_function_calls(_reference("f", args, "python_list"))


def test_reference_style_changes_a_backslash_escape():
    args = {"s": "a\\nb"}  # a backslash then n, written raw, reads back as a newline
    assert parse_python_list_for_function_calls(_reference("f", args, "python_list")) == [("f", {"s": "a\nb"})]


def test_python_literals_for_builtin_query_and_several_calls():
    text = encode_call("brave_search", {"query": 'the "best" one'}, "python_list", literals="python")
    assert text == 'brave_search.call(query="the \\"best\\" one")'
    listed = "[" + ", ".join(pythonic_call(n, a, literals="python") for n, a in [("f", {"a": {"b": 1}}),
                                                                               ("g", {"c": "x"})]) + "]"
    assert parse_python_list_for_function_calls(listed) == [("f", {"a": {"b": 1}}), ("g", {"c": "x"})]


@pytest.mark.parametrize("bad", [
    lambda: encode_call("f", {"v": 1}, "python_list", literals="yaml"),
    lambda: encode_call("f", {"v": float("inf")}, "python_list", literals="python"),
    lambda: encode_call("f", {"v": (1, 2)}, "python_list"),
    lambda: encode_call("f", {"v": 1}, "xml"),
])
def test_unwritable_values_and_unknown_styles_are_typed_errors(bad):
    with pytest.raises(ChatFormatError):
        bad()


def test_json_arguments_round_trip_unchanged():
    args = json.loads(call("f", a={"b": [1, 2]})["function"]["arguments"])
    assert json.loads(encode_call("f", args, "function_tag")[len("<function=f>"):-len("</function>")]) == args
