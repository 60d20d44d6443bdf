"""A short run of bench/fuzz_loaders.py's targets: each mutated input is accepted or refused with a typed error.

Targets: safetensors headers, config.json, params.json, Meta .pth zips, tiktoken / tokenizer.json / SentencePiece
files, chat templates, tool-call outputs, images, OpenAI and Ollama request bodies (a 4xx is the typed answer).
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from bench.fuzz_loaders import TARGETS, fuzz_one
from llamaherd.chat.hf_template import compile_template
from llamaherd.errors import ChatFormatError


@pytest.fixture(scope="module", params=sorted(TARGETS))
def target(request, tmp_path_factory):
    make, fname, mutate, consume = TARGETS[request.param]
    folder = make(tmp_path_factory.mktemp(request.param) / "input")
    return folder, fname, (folder / fname).read_bytes(), mutate, consume


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1))
def test_mutated_input_is_accepted_or_refused_with_a_typed_error(target, seed):
    folder, fname, valid, mutate, consume = target
    outcome, _, detail = fuzz_one(folder, fname, valid, mutate, random.Random(seed), consume)
    assert outcome != "crash", detail


def test_the_valid_inputs_are_accepted(target):
    folder, fname, valid, _, consume = target
    outcome, _, detail = fuzz_one(folder, fname, valid, lambda data, rng: data, random.Random(0), consume)
    assert outcome == "accepted", detail


def test_deeply_nested_template_is_a_typed_error():
    # Found by the chat_template target: jinja2's parser recursed past Python's limit (RecursionError).
    with pytest.raises(ChatFormatError, match="nests too deeply"):
        compile_template("{{ bos_token }}" + "{" * 5000)


def test_huge_integer_literal_in_a_template_is_a_typed_error():
    # Found by the chat_template target: the lexer's int() of a 5000-digit literal raised ValueError.
    with pytest.raises(ChatFormatError, match="does not compile"):
        compile_template("{{ " + "9" * 5000 + " }}")
