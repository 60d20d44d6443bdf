"""Model.generate / Model.chat: checkpoint defaults, end tokens, chat-format choice and tool calls end to end."""

import pytest
import torch

from llamaherd.api import Model, chat_format_name
from llamaherd.checkpoint.base import Checkpoint
from llamaherd.config import GenerationDefaults, ModelConfig
from llamaherd.engine.generate import greedy_reference
from llamaherd.errors import ChatFormatError, ContextLengthError
from llamaherd.model import build

from .conftest import random_model


@pytest.fixture(scope="module")
def tok():
    from llamaherd.tokenizer import Tokenizer

    return Tokenizer.llama3()


def tiny_config(tok, **kw):
    return ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=tok.vocab_size, multiple_of=32,
                       rope_theta=5e5, max_seq_len=kw.pop("max_seq_len", 128), **kw)


def bigram_model(tok, chain: list[int], **ckpt_kw) -> Model:
    """A decoder that deterministically says `chain[i+1]` after `chain[i]`: attention and MLP outputs are zero,
    so each position's logits depend on its own token only; embeddings are one-hot, the output maps each
    chain token's direction to its successor. Lets a test script the exact text a model emits."""
    config = tiny_config(tok, tie_embeddings=False, max_seq_len=512)
    assert len(chain) <= config.dim and len(set(chain[:-1])) == len(chain) - 1
    net = build(config)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        for layer in net.layers:
            layer.attention_norm.weight.fill_(1.0)
            layer.ffn_norm.weight.fill_(1.0)
        net.norm.weight.fill_(1.0)
        for k, (cur, nxt) in enumerate(zip(chain, chain[1:])):
            net.tok_embeddings.weight[cur, k] = 1.0
            net.output.weight[nxt, k] = 10.0
    return Model(net, Checkpoint(config, net.state_dict(), "bigram", tokenizer=tok, **ckpt_kw))


def test_chat_parses_a_tool_call_end_to_end(tok):
    # Llama 3.2's pythonic tool-call syntax; the prompt ends with the assistant header's "\n\n" (id 271).
    call = tok.encode('[get_weather(city="Paris")]')
    eot = tok.special_id("eot_id")
    m = bigram_model(tok, [271] + call + [eot], metadata={"chat_format": "llama3.2"})
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    msg = m.chat([{"role": "user", "content": "Weather in Paris?"}], tools=tools, temperature=0, max_tokens=50)
    assert msg["role"] == "assistant" and not msg["content"]
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["get_weather"]
    assert msg["tool_calls"][0]["function"]["arguments"].replace(" ", "") == '{"city":"Paris"}'
    assert msg["stop_reason"] == "end_of_turn"
    streamed = "".join(m.chat([{"role": "user", "content": "Weather in Paris?"}], tools=tools, stream=True,
                              temperature=0, max_tokens=50))
    assert streamed == '[get_weather(city="Paris")]'


def test_plain_chat_reply_matches_reference(tok):
    config = tiny_config(tok, tie_embeddings=True)
    net = random_model(config, std=0.5, seed=3)
    m = Model(net, Checkpoint(config, net.state_dict(), "tiny", tokenizer=tok))
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    from llamaherd.chat import get_format

    ids = get_format("llama3", tok).encode_dialog(msgs)
    ref = greedy_reference(net, ids, 10)
    stops = get_format("llama3", tok).stop_ids
    cut = next((i for i, t in enumerate(ref) if t in stops), len(ref))
    msg = m.chat(msgs, temperature=0, max_tokens=10)
    assert msg["content"] == tok.decode(ref[:cut]) and msg["tool_calls"] == []


def test_generation_config_defaults_and_eos_list(tok):
    config = tiny_config(tok, tie_embeddings=True)
    net = random_model(config, std=0.5, seed=4)
    prompt = tok.encode("Once upon", bos=True)
    ref = greedy_reference(net, prompt, 12)
    stop_at = next(i for i in range(3, 12) if ref[i] not in ref[:i])
    # generation_config.json: temperature 0 (greedy) and an eos list naming a token the model will produce
    gen = GenerationDefaults(temperature=0.0, eos_token_ids=(ref[stop_at],))
    m = Model(net, Checkpoint(config, net.state_dict(), "tiny", tokenizer=tok, generation=gen))
    done = m.complete("Once upon", max_tokens=12)
    assert done.token_ids == ref[:stop_at] and done.finish_reason == "stop" and done.stop_token == ref[stop_at]
    # ignore_eos runs past it; an explicit temperature overrides the checkpoint's
    assert m.complete("Once upon", max_tokens=12, ignore_eos=True).token_ids == ref
    assert m.complete("Once upon", max_tokens=12, ignore_eos=True, temperature=1.0, seed=5).token_ids != ref


def test_chat_format_is_chosen_from_the_checkpoint(tok):
    from llamaherd.tokenizer import Tokenizer

    config = tiny_config(tok)
    ck = lambda **kw: Checkpoint(config, {}, "x", **kw)  # noqa: E731
    assert chat_format_name(ck(tokenizer=tok)) == "llama3"
    assert chat_format_name(ck(tokenizer=Tokenizer.llama4())) == "llama4"
    assert chat_format_name(ck(tokenizer=None, chat_template="{{ messages }}")) == "hf"
    assert chat_format_name(ck(tokenizer=tok, metadata={"chat_format": "llama3.2"})) == "llama3.2"
    with pytest.raises(ChatFormatError, match="chat format"):
        chat_format_name(ck(tokenizer=None))


def test_chat_longer_than_context_raises_with_lengths(tok):
    config = tiny_config(tok, tie_embeddings=True, max_seq_len=64)
    net = random_model(config)
    m = Model(net, Checkpoint(config, net.state_dict(), "tiny", tokenizer=tok))
    with pytest.raises(ContextLengthError, match=r"the prompt is \d+ tokens but .* is 64 tokens"):
        m.chat([{"role": "user", "content": "word " * 80}])
