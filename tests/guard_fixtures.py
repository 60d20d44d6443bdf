"""Tiny random-weight Llama 3 models (official tokenizer) whose Llama Guard answer is forced by weight edits.

The edits make the network a bigram chain on a few tokens: each chain token's embedding is a large one-hot
direction, and the output row of the token that must follow reads that direction. Layers keep small random
weights, so the forward pass runs in full; nothing in the guard code is mocked.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llamaherd.api import Model
from llamaherd.checkpoint.base import Checkpoint
from llamaherd.config import GenerationDefaults, ModelConfig
from llamaherd.tokenizer import Tokenizer

from .conftest import random_model

CONFIG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32,
                     rope_theta=500000.0, max_seq_len=4096)


def forced_guard(answer: str, *, split: float | None = None, seed: int = 0, template: str | None = None) -> Model:
    """A model that answers `answer` greedily after the assistant header ("\\n\\n" first, as Llama Guard 3 does).

    With `split`, the step that picks the first word gives 'unsafe' and 'safe' logits `split` apart
    (P(unsafe) = sigmoid(split) among the two), so thresholds can be exercised.
    """
    tok = Tokenizer.llama3()
    chain = [tok.special_id("<|end_header_id|>")] + tok.encode("\n\n" + answer) + [tok.special_id("<|eot_id|>")]
    net = random_model(CONFIG, seed=seed, std=0.02)
    with torch.no_grad():
        emb, out = net.tok_embeddings.weight, net.output.weight
        for k, (cur, nxt) in enumerate(zip(chain, chain[1:])):
            emb[cur] = 0.0
            emb[cur, k] = 10.0  # (dim,) one-hot direction of the k-th chain token
            out[nxt, k] = 50.0
        if split is not None:  # the token after "\n\n" chooses between the two words
            k = 1
            safe, unsafe = tok.encode("safe")[0], tok.encode("unsafe")[0]
            out[safe, k], out[unsafe, k] = 50.0, 50.0
            scale = float(net.norm.weight[k]) * (CONFIG.dim ** 0.5)  # RMSNorm of a one-hot row of norm 10
            out[unsafe, k] += split / scale
    ckpt = Checkpoint(CONFIG, {}, Path(f"forced-guard-{answer.split()[0] if answer else 'empty'}"), tokenizer=tok,
                      generation=GenerationDefaults(eos_token_ids=(tok.special_id("<|eot_id|>"),)),
                      chat_template=template)
    return Model(net, ckpt)


def save_forced_guard(model: Model, dst: Path) -> Path:
    """The forced model as a Hugging Face folder (config.json, safetensors, the official tokenizer.model)."""
    import shutil
    from importlib import resources

    from llamaherd.checkpoint.save import save

    ckpt = Checkpoint(model.config, {k: v.detach().clone() for k, v in model.net.state_dict().items()},
                      dst, tokenizer=model.tokenizer, generation=model.generation_defaults,
                      chat_template=model.checkpoint.chat_template)
    save(ckpt, dst, "hf")
    with resources.as_file(resources.files("llama_models.llama3").joinpath("tokenizer.model")) as p:
        shutil.copyfile(p, dst / "tokenizer.model")
    return dst


def trigger_guard(trigger_id: int, *, seed: int = 0) -> Model:
    """A guard that answers "unsafe\\nS1" when token `trigger_id` is anywhere in its prompt, else "safe".

    Weight edits on a tiny random Llama 3 (dim 64): a bigram chain writes the answer; one attention head lets
    the answer's positions find the trigger. Its query reads a flag carried by the <|end_header_id|> and "\\n\\n"
    embeddings, its key a direction only the trigger's embedding has, both in the head's slowest rotary pair
    (so the score hardly depends on distance); value and output copy the trigger's presence into a residual
    direction that the output row of 'unsafe' reads, against a fixed logit for 'safe'.
    """
    tok = Tokenizer.llama3()
    config = ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=128256, multiple_of=32,
                         rope_theta=500000.0, max_seq_len=4096)
    net = random_model(config, seed=seed, std=0.02)
    end_header, eot = tok.special_id("<|end_header_id|>"), tok.special_id("<|eot_id|>")
    blank, safe, unsafe = tok.encode("\n\n")[0], tok.encode("safe")[0], tok.encode("unsafe")[0]
    chain_unsafe = [unsafe, *tok.encode("\nS1"), eot]
    QUERY, KEY, FLAG = 20, 21, 22  # residual directions
    slow = config.head_dim - 2  # head 0's slowest rotary pair: rows slow, slow + 1
    with torch.no_grad():
        emb, out = net.tok_embeddings.weight, net.output.weight
        layer = net.layers[0].attention

        def one_hot(token: int, k: int) -> None:
            emb[token] = 0.0
            emb[token, k] = 10.0

        one_hot(end_header, 0)
        one_hot(blank, 1)
        emb[end_header, QUERY] = emb[blank, QUERY] = 10.0
        out[blank, 0] = 50.0  # <|end_header_id|> -> "\n\n"
        out[safe, 1] = 10.0  # "\n\n" -> "safe", unless the flag says otherwise
        out[unsafe, FLAG] = 30.0
        for k, (cur, nxt) in enumerate(zip(chain_unsafe, chain_unsafe[1:]), start=2):
            one_hot(cur, k)
            out[nxt, k] = 50.0
        one_hot(safe, 9)
        out[eot, 9] = 50.0
        emb[trigger_id] = 0.0
        emb[trigger_id, KEY] = 10.0
        layer.wq.weight[slow, QUERY] = layer.wk.weight[slow, KEY] = 1.3
        layer.wv.weight[0] = 0.0
        layer.wv.weight[0, KEY] = 1.0
        layer.wo.weight[FLAG] = 0.0
        layer.wo.weight[FLAG, 0] = 1.0
    ckpt = Checkpoint(config, {}, Path(f"trigger-guard-{trigger_id}"), tokenizer=tok,
                      generation=GenerationDefaults(eos_token_ids=(eot,)))
    return Model(net, ckpt)
