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
