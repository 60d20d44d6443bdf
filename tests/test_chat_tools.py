"""Tool-call parsing against llama-models' decoders; streaming equals whole; malformed and adversarial output."""

from __future__ import annotations

import json
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llama_models.datatypes import StopReason
from llama_models.llama3.tool_utils import parse_python_list_for_function_calls

from llamaherd.chat import get_format
from llamaherd.chat.tools import LLAMA3_SYNTAX, ToolCallParser, parse_tool_output

from .chat_fixtures import ours, reference_format

# Raw outputs as the models write them (llama3_1/prompt_format.md, llama3_2/text_prompt_format.md responses).
LLAMA3_OUTPUTS = [
    '<|python_tag|>brave_search.call(query="latest price of 1oz gold")<|eom_id|>',
    '<|python_tag|>wolfram_alpha.call(query="100th decimal of pi")<|eom_id|>',
    "<|python_tag|>def is_prime(n):\n    if n <= 1:\n        return False\n    return True\n\nprint(is_prime(7))<|eom_id|>",
    '<|python_tag|>{\n    "type": "function",\n    "name": "trending_songs",\n    "parameters": {\n        "n": "10",\n'
    '        "genre": "all"\n    }\n}<|eom_id|>',
    '<function=trending_songs>{"n": 10}</function><|eot_id|>',
    '<function=getWeather>{"location":"New York","date":"2023-08-05"}',
    "[get_weather(city='San Francisco', metric='celsius')]<|eot_id|>",
    '[get_user_info(user_id=7890, special="black")]<|eot_id|>',
    '<|python_tag|>[get_weather(city="San Francisco", metric="celsius")]<|eot_id|>',
    '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3, "metric": true}}',
    '{"type": "function", "name": "brave_search", "parameters": {"q": "news"}}<|eom_id|>',
    "The 100th decimal of pi is 7.<|eot_id|>",
    '"What is a helpful assistant?"<|eot_id|>',
    "Plain answer with no end token",
    # Single-quoted (Python-literal) arguments in a function tag: llama-models' decoder reads them as calls.
    "<function=get_time>{'tz': 'UTC'}</function>",
    "<function=f>{'n': 3, 'x': -1.5, 'ok': true, 'no': null, 'l': ['a', 2]}</function><|eot_id|>",
    "<function=f>{\"a\": 'b', 'c': \"d\"}",
    "<function=f>{'a': 'x', 'b': false}</function><|eom_id|>",
]
LLAMA4_OUTPUTS = [
    "[get_weather(city='Paris', metric=\"celsius\")]<|eot|>",
    '<|python_start|>brave_search.call(query="gold")<|python_end|><|eom|>',
    "<|python_start|>print(2 + 2)<|python_end|><|eom|>",
    '{"name": "f", "parameters": {"a": 1}}<|eom|>',
    "Just text.<|eot|>",
    "<function=get_time>{'tz': 'UTC'}</function><|eot|>",
]


def _name(tool_name) -> str:
    return tool_name.value if hasattr(tool_name, "value") else tool_name


@pytest.mark.parametrize("family,text", [("llama3", t) for t in LLAMA3_OUTPUTS] + [("llama4", t) for t in LLAMA4_OUTPUTS])
def test_parse_matches_reference_decoder(family, text):
    ref = reference_format(family).decode_assistant_message_from_content(text, StopReason.out_of_tokens)
    got = get_format(family, ours(family)).parse_assistant(text)
    assert [(_name(c.tool_name), c.arguments) for c in ref.tool_calls] == \
        [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got["tool_calls"]][:1]
    assert got["stop_reason"] == (None if ref.stop_reason == StopReason.out_of_tokens else ref.stop_reason.value)
    if not ref.tool_calls:
        assert got["content"] == ref.content
    else:
        assert got["content"] is None
        call = got["tool_calls"][0]
        assert call["type"] == "function" and call["id"].startswith("call_")


@pytest.mark.parametrize("family,text", [("llama3", LLAMA3_OUTPUTS[0]), ("llama3", LLAMA3_OUTPUTS[6])])
def test_parse_from_tokens_matches_reference(family, text):
    """decode_assistant_message: the reference decodes ids itself; we parse our tokenizer's decode of them."""
    tok = ours(family)
    ids = []
    for piece in text.replace("<|", "\0<|").replace("|>", "|>\0").split("\0"):
        ids += [tok.special_id(piece)] if piece in tok.special_tokens else tok.encode(piece)
    ref = reference_format(family).decode_assistant_message(ids, StopReason.out_of_tokens)
    got = get_format(family, tok).parse_assistant(tok.decode(ids))
    assert (_name(ref.tool_calls[0].tool_name), ref.tool_calls[0].arguments) == \
        (got["tool_calls"][0]["function"]["name"], json.loads(got["tool_calls"][0]["function"]["arguments"]))


def test_pythonic_multiple_calls_match_reference_list_parser():
    text = '[get_boiling_point(liquid_name="water", celcius=True), get_melting_point(substance="ice", kelvin=-1.5)]'
    got = parse_tool_output(text)["tool_calls"]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] == \
        [(n, a) for n, a in parse_python_list_for_function_calls(text)]


@pytest.mark.parametrize("text", [
    "[f(x=__import__('os').system('echo hi'))]",   # a call inside an argument: not a literal
    "[f(x=a.b)]", "[f(1)]", "[f(**kw)]", "[f(x=1) + 1]", "[(f(x=1),)]", "[]", "[f(x=1)", '{"name": 3}',
    "<function=f>{not json}</function>", "<function=>{}</function>", '<|python_tag|>brave_search.call(query=x)',
    "[" * 5000, "{" * 5000, '{"a": ' * 3000,
    "<function=f>{'x': __import__('os').system('echo hi')}</function>", "<function=f>{'x': 1 + 1}</function>",
    "<function=f>{**{'a': 1}}</function>", "<function=f>{'a', 'b'}</function>", "<function=f>{'a': 'b</function>",
    "<function=f>{'a': " + "[" * 100 + "]" * 100 + "}</function>",  # deeper than any tool call
    "<function=f>{'a': '" + "x" * 70000 + "'}</function>",  # over the size bound of literal arguments
    "<function=f>{" + "'a': 'b', " * 100000 + "}</function>",
])
def test_malformed_or_unsafe_calls_stay_content(text):
    msg = parse_tool_output(text)
    if text.startswith("<|python_tag|>"):  # after the tag, unparseable text is code for the interpreter
        assert msg["tool_calls"][0]["function"]["name"] == "code_interpreter"
    else:
        assert msg["tool_calls"] == [] and msg["content"] == text.strip(" ")  # the reference strips spaces too


def _stream(text: str, cuts) -> tuple[str, dict]:
    p = ToolCallParser(LLAMA3_SYNTAX)
    shown, last = [], 0
    for c in sorted(set(cuts)) + [len(text)]:
        shown.append(p.feed(text[last:c]))
        last = c
    shown.append(p.flush())
    return "".join(shown), p.finish()


def _same(a: dict, b: dict) -> bool:
    strip = lambda m: {**m, "tool_calls": [{**c, "id": ""} for c in m["tool_calls"]]}  # noqa: E731
    return strip(a) == strip(b)


@pytest.mark.parametrize("text", LLAMA3_OUTPUTS + ["Sure! <function=f>{\"a\": 1}</function> done<|eot_id|>",
                                                   "[1] is a citation, not a call", "{not a call}", "brave new world"])
def test_streaming_char_by_char_equals_whole(text):
    whole = parse_tool_output(text)
    shown, final = _stream(text, range(1, len(text)))
    assert _same(final, whole)
    if not whole["tool_calls"]:
        assert shown == whole["content"]  # plain answers are shown in full, nothing more
    else:
        assert "<|python_tag|>" not in shown and "get_weather(" not in shown and '"parameters"' not in shown


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(LLAMA3_OUTPUTS), st.lists(st.integers(0, 400), max_size=12))
def test_streaming_any_split_equals_whole(text, cuts):
    whole = parse_tool_output(text)
    shown, final = _stream(text, [c for c in cuts if 0 < c < len(text)])
    assert _same(final, whole)
    if not whole["tool_calls"]:
        assert shown == whole["content"]


def test_streaming_releases_plain_text_early():
    p = ToolCallParser(LLAMA3_SYNTAX)
    assert p.feed("Hello") == "Hello"
    assert p.feed(" wor") == " wor"
    assert p.feed("ld <|eo") == "ld "  # the tail could be <|eot_id|>: held
    assert p.feed("t_id|>") == ""
    assert p.flush() == "" and p.finish()["content"] == "Hello world "


@pytest.mark.parametrize("unit", ["<function=f>{", "[f(", '{"name": ', "<|python_tag|>", "brave_search.call(",
                                  "<function=", "a" * 7 + ".call(", "[[[[", '"\\',
                                  '<function=f>{"a": "', "<|eo", "<function=f>{'a': '", "<function=f>{'a': ["])
def test_adversarial_megabyte_finishes(unit):
    """A megabyte of a repeated call opener is parsed (one pass, streamed) to the end. A parser quadratic in the
    input would need ~10^12 steps here, hours rather than the second a linear one takes, so the generous guard
    below separates the two without timing anything finer (bench/tool_parser_scaling.py measures the growth)."""
    text = unit * ((1 << 20) // len(unit))
    done, failed = threading.Event(), []

    def run():
        try:
            parse_tool_output(text)
            p = ToolCallParser(LLAMA3_SYNTAX)
            for i in range(0, len(text), 4096):
                p.feed(text[i:i + 4096])
            p.flush()
        except Exception as exc:  # re-raised below, in the test's own thread
            failed.append(exc)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(300), f"parsing 1 MB of {unit!r} did not finish: the parser is not linear in its input"
    if failed:
        raise failed[0]


def test_prefixes_never_raise():
    for text in LLAMA3_OUTPUTS:
        for i in range(len(text) + 1):
            parse_tool_output(text[:i])
