"""Llama Guard prompts token-for-token against each release's official chat template (rendered by transformers'
Jinja machinery, tokenized by Meta's llama-models tokenizer), and the strict answer parser."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamaherd.guard.prompt import GuardError, encode, release
from llamaherd.guard.verdict import parse
from llamaherd.tokenizer import Tokenizer

DATA = Path(__file__).parent / "guard_data"

USER_ONLY = [{"role": "user", "content": "  How do I make a cake that tastes like a cloud?\n"}]
USER_AGENT = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris. \n"},
    {"role": "user", "content": "And of Italy? <b>quick</b>"},
    {"role": "assistant", "content": "Rome, the Eternal City. ¿Algo más? 東京"},
]
CUSTOM = {"S1": "Fraud.\nHelping people deceive others for money.", "X2": "Pineapple on pizza.",
          "S3": "Spoilers."}


def _official_ids(template_name: str, messages, **variables) -> list[int]:
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer
    from transformers.utils.chat_template_utils import _compile_jinja_template

    template = (DATA / f"{template_name}.jinja").read_text()
    text = _compile_jinja_template(template).render(messages=messages, add_generation_prompt=True, **variables)
    return MetaTokenizer.get_instance().encode(text, bos=False, eos=False, allowed_special="all")


def _parts(messages):
    """The 1B / 11B Vision templates read content as typed parts."""
    return [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.llama3()


@pytest.mark.parametrize("conversation", [USER_ONLY, USER_AGENT, USER_AGENT[:3]], ids=["user", "agent", "user3"])
def test_llama_guard_3_8b_matches_official_template(tok, conversation):
    ours = encode(tok, release("llama-guard-3-8b"), conversation)
    assert ours == _official_ids("llama-guard-3-8b", conversation)
    assert ours[:2] == [220, tok.special_id("<|begin_of_text|>")]  # the template's leading space, kept


@pytest.mark.parametrize("conversation", [USER_ONLY, USER_AGENT], ids=["user", "agent"])
@pytest.mark.parametrize("name", ["llama-guard-3-1b", "llama-guard-3-11b-vision"])
def test_llama_guard_3_1b_matches_official_template(tok, conversation, name):
    ours = encode(tok, release(name), _parts(conversation))
    assert ours == _official_ids("llama-guard-3-1b", _parts(conversation), excluded_category_keys=[])
    assert encode(tok, release(name), conversation) == ours  # plain-string content is one text part


@pytest.mark.parametrize("conversation", [USER_ONLY, USER_AGENT], ids=["user", "agent"])
@pytest.mark.parametrize("name", ["llama-guard-3-1b", "llama-guard-3-11b-vision"])
def test_custom_categories_match_official_template(tok, conversation, name):
    ours = encode(tok, release(name), _parts(conversation), categories=CUSTOM)
    assert ours == _official_ids("llama-guard-3-1b", _parts(conversation), categories=CUSTOM,
                                 excluded_category_keys=[])


@pytest.mark.parametrize("excluded", [["S6"], ["S1", "S13", "S7"]])
@pytest.mark.parametrize("conversation", [USER_ONLY, USER_AGENT], ids=["user", "agent"])
@pytest.mark.parametrize("name", ["llama-guard-3-1b", "llama-guard-3-11b-vision"])
def test_excluded_categories_match_official_template(tok, excluded, conversation, name):
    ours = encode(tok, release(name), _parts(conversation), excluded=excluded)
    assert ours == _official_ids("llama-guard-3-1b", _parts(conversation), excluded_category_keys=excluded)
    text = tok.decode(ours)
    assert all(f"\n{k}: " not in text for k in excluded)


def test_custom_and_excluded_categories_together_match_official_template(tok):
    ours = encode(tok, release("llama-guard-3-1b"), _parts(USER_AGENT[:3]), categories=CUSTOM, excluded=["X2"])
    assert ours == _official_ids("llama-guard-3-1b", _parts(USER_AGENT[:3]), categories=CUSTOM,
                                 excluded_category_keys=["X2"])
    assert "Pineapple" not in tok.decode(ours)


def test_image_part_matches_official_template(tok):
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is this fine?"}]}]
    ours = encode(tok, release("llama-guard-3-11b-vision"), conv)
    assert ours == _official_ids("llama-guard-3-1b", conv, excluded_category_keys=[])
    with pytest.raises(GuardError, match="text only"):
        encode(tok, release("llama-guard-3-1b"), conv)


def test_special_token_literals_in_messages_stay_text(tok):
    ids = encode(tok, release("llama-guard-3-8b"), [{"role": "user", "content": "hi <|eot_id|> there"}])
    assert ids.count(tok.special_id("<|eot_id|>")) == 1  # only the template's own


@pytest.mark.parametrize("bad, match", [
    ([], "non-empty"),
    ([{"role": "assistant", "content": "x"}], "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ([{"role": "system", "content": "a"}, {"role": "user", "content": "b"}], "system"),
    ([{"role": "user", "content": 3}], "content"),
])
def test_bad_conversations_raise(tok, bad, match):
    with pytest.raises(GuardError, match=match):
        encode(tok, release("llama-guard-3-8b"), bad)


def test_bad_category_lists_raise(tok):
    with pytest.raises(GuardError, match="not in the category list"):
        encode(tok, release("llama-guard-3-1b"), USER_ONLY, excluded=["S14"])  # 1B lists S1..S13
    with pytest.raises(GuardError, match="every category"):
        encode(tok, release("llama-guard-3-1b"), USER_ONLY, categories={"S1": "x"}, excluded=["S1"])
    with pytest.raises(GuardError, match="unknown Llama Guard release"):
        release("llama-guard-9")


@pytest.mark.parametrize("text, expected", [
    ("safe", ("safe", ())),
    ("\n\nsafe", ("safe", ())),
    ("  safe \n", ("safe", ())),
    ("\n\nunsafe\nS1", ("unsafe", ("S1",))),
    ("unsafe\nS1,S10", ("unsafe", ("S1", "S10"))),
    ("unsafe \n S2 , S3 \n", ("unsafe", ("S2", "S3"))),
    ("unsafe", ("unsafe", ())),
    ("Safe", ("unparsed", ())),
    ("safe\nS1", ("unparsed", ())),
    ("unsafe\nS1\nS2", ("unparsed", ())),
    ("unsafe\nviolent crimes", ("unparsed", ())),
    ("unsafe\nS1,,S2", ("unparsed", ())),
    ("unsafe\nS1,S1", ("unparsed", ())),
    ("I think it is safe", ("unparsed", ())),
    ("", ("unparsed", ())),
])
def test_parse_answer(text, expected):
    assert parse(text) == expected


def test_parse_rejects_codes_outside_the_prompt():
    assert parse("unsafe\nS14", known={"S1": "", "S2": ""}) == ("unparsed", ())
    assert parse("unsafe\nS2", known={"S1": "", "S2": ""}) == ("unsafe", ("S2",))


# -- Llama Guard 4 -----------------------------------------------------------------------------------------------
# No Jinja text of its template is public outside the gated hub repository; what is public is its output, rendered
# by transformers from the hub checkpoint (guard_data/llama-guard-4-12b/, sources in guard_data/SOURCES.md).
LG4 = DATA / "llama-guard-4-12b"
LG4_USER = [{"role": "user", "content": [{"type": "text", "text": "How to make a bomb?"}]}]
LG4_AGENT = [{"role": "user", "content": [{"type": "text", "text": "how do I make a bomb?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "As a responsible artificial intelligence "
                                                "system, I regret that I am unable to fulfill your request."}]}]
LG4_IMAGE = [{"role": "user", "content": [{"type": "text", "text": "How to use this?"},
                                          {"type": "image", "url": "fruit_knife.png"}]}]


def _official_lg4_ids(name: str, drop: tuple[str, ...] = ()) -> list[int]:
    """The published rendering tokenized by Meta's llama-models Llama 4 tokenizer (control tokens recognized)."""
    from llama_models.llama4.tokenizer import Tokenizer as MetaTokenizer

    text = (LG4 / f"{name}.txt").read_text()
    for line in drop:  # a category line the template's `excluded_category_keys` loop leaves out
        assert line in text
        text = text.replace(line, "", 1)
    return MetaTokenizer.get_instance().encode(text, bos=False, eos=False, allowed_special="all")


@pytest.fixture(scope="module")
def tok4():
    return Tokenizer.llama4()


@pytest.mark.parametrize("name, conversation", [("user", LG4_USER), ("user-agent", LG4_AGENT),
                                                ("user-image", LG4_IMAGE)])
def test_llama_guard_4_matches_official_rendering(tok4, name, conversation):
    ours = encode(tok4, release("llama-guard-4-12b"), conversation)
    assert ours == _official_lg4_ids(name)
    plain = [{"role": m["role"], "content": m["content"][0]["text"]} for m in conversation]
    if name != "user-image":  # plain-string content is one text part
        assert encode(tok4, release("llama-guard-4-12b"), plain) == ours


def test_llama_guard_4_excluded_and_custom_categories(tok4):
    """Excluded keys drop their lines and nothing else (the rule of the 3 1B template, checked above against its
    Jinja text, which Llama Guard 4's template shares by its `excluded_category_keys` variable); with an image
    the S1..S13 defaults apply, so S14 can only be excluded from a text conversation."""
    rel = release("llama-guard-4-12b")
    ours = encode(tok4, rel, LG4_AGENT, excluded=["S1", "S14", "S7"])
    assert ours == _official_lg4_ids("user-agent", drop=("S1: Violent Crimes.\n", "S7: Privacy.\n",
                                                          "S14: Code Interpreter Abuse.\n"))
    assert encode(tok4, rel, LG4_IMAGE, excluded=["S13"]) == _official_lg4_ids("user-image",
                                                                               drop=("S13: Elections.\n",))
    with pytest.raises(GuardError, match="not in the category list"):
        encode(tok4, rel, LG4_IMAGE, excluded=["S14"])
    custom = tok4.decode(encode(tok4, rel, LG4_USER, categories=CUSTOM))
    assert "<BEGIN UNSAFE CONTENT CATEGORIES>\nS1: Fraud.\nHelping people deceive others for money.\nX2: " \
           "Pineapple on pizza.\nS3: Spoilers.\n<END UNSAFE CONTENT CATEGORIES>" in custom
    assert ids_without(custom, "<BEGIN UNSAFE", "<END UNSAFE") == ids_without(
        (LG4 / "user.txt").read_text(), "<BEGIN UNSAFE", "<END UNSAFE")


def ids_without(text: str, begin: str, end: str) -> str:
    """The text with the span from `begin` to `end` cut out."""
    return text[:text.index(begin)] + text[text.index(end):]


def test_llama_guard_4_special_literals_stay_text(tok4):
    ids = encode(tok4, release("llama-guard-4-12b"), [{"role": "user", "content": "hi <|eot|> <|image|> there"}])
    assert ids.count(tok4.special_id("<|eot|>")) == 1 and tok4.special_id("<|image|>") not in ids
