"""Streamed text for display can leave control tokens out (herd run's raw completion), and keeps them by default."""

from .server_fixtures import tiny_llama3


def test_skip_special_tokens_in_streamed_text():
    model = tiny_llama3()
    tok = model.tokenizer
    reserved = tok.special_id("<|reserved_special_token_5|>")
    word = tok.encode(" sky")[0]
    # Alternate a control token and a word by biasing both far above everything else.
    kwargs = dict(max_tokens=6, temperature=0, logit_bias={reserved: 100.0, word: 99.9}, repetition_penalty=1.0)
    shown = "".join(model.generate("Hello", stream=True, **kwargs))
    hidden = "".join(model.generate("Hello", stream=True, skip_special_tokens=True, **kwargs))
    assert "<|reserved_special_token_5|>" in shown
    assert "<|reserved_special_token_5|>" not in hidden and hidden == shown.replace("<|reserved_special_token_5|>", "")
