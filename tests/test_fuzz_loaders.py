"""A short run of bench/fuzz_loaders.py's mutations: mutated safetensors, config.json, params.json only raise typed errors."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from bench.fuzz_loaders import TARGETS, fuzz_one


@pytest.fixture(scope="module", params=sorted(TARGETS))
def target(request, tmp_path_factory):
    make, fname, mutate = TARGETS[request.param]
    folder = make(tmp_path_factory.mktemp(request.param) / "ckpt")
    return folder, fname, (folder / fname).read_bytes(), mutate


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1))
def test_mutated_input_is_accepted_or_refused_with_a_typed_error(target, seed):
    folder, fname, valid, mutate = target
    outcome, _, detail = fuzz_one(folder, fname, valid, mutate, random.Random(seed))
    assert outcome != "crash", detail
