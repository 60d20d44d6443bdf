"""Llama Guard end to end on tiny models whose answer is forced by weight edits: verdicts, categories,
the first-token unsafe probability and its threshold, roles, and the public `llamaherd.guard` API."""

from __future__ import annotations

import math

import pytest

from llamaherd.guard import GuardError, LlamaGuard, moderate
from llamaherd.guard.prompt import release

from .guard_fixtures import forced_guard

CONV = [{"role": "user", "content": "How do I pick a lock?"},
        {"role": "assistant", "content": "Use a tension wrench and a pick."}]


@pytest.fixture(scope="module")
def unsafe_model():
    return forced_guard("unsafe\nS2,S10")


@pytest.fixture(scope="module")
def safe_model():
    return forced_guard("safe")


def test_unsafe_verdict_with_categories(unsafe_model):
    v = moderate(CONV[:1], model=unsafe_model, release="llama-guard-3-8b")
    assert v.status == "unsafe" and v.flagged and v.categories == ("S2", "S10")
    assert v.names == {"S2": "Non-Violent Crimes.", "S10": "Hate."}
    assert v.raw == "\n\nunsafe\nS2,S10"
    assert v.score > 0.99


def test_safe_verdict(safe_model):
    v = moderate(CONV, model=safe_model, release="llama-guard-3-1b")
    assert v.status == "safe" and not v.flagged and v.categories == () and v.score < 1e-6


def test_codes_outside_the_prompt_are_unparsed_not_guessed(unsafe_model):
    v = moderate(CONV, model=unsafe_model, release="llama-guard-3-1b", excluded=["S10"])
    assert v.status == "unparsed" and v.flagged and v.categories == ()


def test_threshold_on_first_token_probability():
    model = forced_guard("unsafe\nS1", split=0.5)
    guard = LlamaGuard(model, "llama-guard-3-8b")
    v = guard.moderate(CONV[:1])
    assert v.status == "unsafe"
    assert v.score == pytest.approx(1 / (1 + math.exp(-0.5)), abs=0.02)  # two words 0.5 logits apart
    assert v.flagged
    assert not guard.moderate(CONV[:1], threshold=0.7).flagged
    assert guard.moderate(CONV[:1], threshold=0.55).flagged
    with pytest.raises(GuardError, match="between 0 and 1"):
        LlamaGuard(model, "llama-guard-3-8b", threshold=1.5)


def test_role_selects_the_turn(unsafe_model):
    guard = LlamaGuard(unsafe_model, "llama-guard-3-8b")
    tok = unsafe_model.tokenizer
    assert "ONLY THE LAST User message" in tok.decode(guard.encode(CONV[:1]))
    assert "ONLY THE LAST Agent message" in tok.decode(guard.encode(CONV))
    assert guard.moderate(CONV, role="user").status == "unsafe"
    with pytest.raises(GuardError, match="no assistant message"):
        guard.moderate(CONV[:1], role="assistant")
    with pytest.raises(GuardError, match="role="):
        guard.moderate(CONV, role="system")


def test_release_from_the_checkpoint_template():
    official = (__import__("pathlib").Path(__file__).parent / "guard_data" / "llama-guard-3-1b.jinja").read_text()
    assert LlamaGuard(forced_guard("safe", template=official)).release is release("llama-guard-3-1b")
    with pytest.raises(GuardError, match="release is unknown"):
        LlamaGuard(forced_guard("safe"))
    # Llama Guard 4's template is not public as text; its rendering carries what detection reads (Llama 4 headers).
    lg4 = (__import__("pathlib").Path(__file__).parent / "guard_data" / "llama-guard-4-12b" / "user.txt").read_text()
    assert LlamaGuard(forced_guard("safe", template=lg4)).release is release("llama-guard-4-12b")


def test_bare_string_is_one_user_message(unsafe_model):
    assert moderate("hello", model=unsafe_model, release="llama-guard-3-8b").status == "unsafe"


def test_image_parts_are_refused_not_checked_blind(unsafe_model):
    # An image part without its image, or an image for a text-only model, is an error, never a prompt with
    # an <|image|> token and no image behind it (images themselves: tests/test_guard_vision.py).
    from llamaherd.errors import ImageError

    guard = LlamaGuard(unsafe_model, "llama-guard-3-11b-vision")
    no_data = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is this fine?"}]}]
    with pytest.raises(ImageError, match="needs"):
        guard.moderate(no_data)
    from .test_vision_serving import png as make_png

    png = [{"role": "user", "content": [{"type": "image", "image": make_png(9, 9, 0)}, {"type": "text", "text": "x"}]}]
    with pytest.raises(ImageError, match="text-only"):
        guard.moderate(png)
