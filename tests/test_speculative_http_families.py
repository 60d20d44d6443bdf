"""Greedy completions over HTTP, many at once, with the server speculating (n-gram lookup or a draft model), are
the text `Model.complete` gives one prompt at a time without speculation, for every family: Llama 3, Llama 4
(MoE), Gemma 3 and Llama 3.2 Vision's decoder text-only. Half the requests turn speculation off
(`speculative: false`), so speculating and plain rows share the batched forwards."""

import asyncio
import copy
from pathlib import Path

import httpx
import pytest
import torch

from llamaherd.api import Model
from llamaherd.checkpoint.base import Checkpoint
from llamaherd.config import GenerationDefaults
from llamaherd.server import ServedModel
from llamaherd.tokenizer import Tokenizer

from .conftest import random_model
from .server_fixtures import LiveServer
from .test_speculative import FAMILIES

# Token-id prompts that repeat their own pieces, so prompt lookup finds matches (the models keep the tiny
# 256-token vocabulary; the Llama 3 tokenizer decodes those ids, its first 256 tokens, to text).
PROMPTS = [[(7 * i + 3 * j) % 256 for j in range(6)] * 3 + [(11 * i + j) % 256 for j in range(3)] for i in range(4)]
N = 12


def _model(family: str) -> Model:
    """A tiny random model of the family, served with the Llama 3 tokenizer (which decodes its output ids)."""
    tok = Tokenizer.llama3()
    config = FAMILIES[family]
    ckpt = Checkpoint(config, {}, Path(f"tiny-{family}"), tokenizer=tok,
                      generation=GenerationDefaults(eos_token_ids=(tok.special_id("<|eot_id|>"),)))
    return Model(random_model(config), ckpt)


def _near_copy(model: Model) -> Model:
    """A draft that agrees with the target often but not always: its weights with a little noise added."""
    net = copy.deepcopy(model.net)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return Model(net, model.checkpoint)


def _complete_all(url: str) -> list[str]:
    async def one(client, i, prompt):
        body = {"prompt": prompt, "max_tokens": N, "temperature": 0, "speculative": i % 2 == 0}
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            return await asyncio.gather(*(one(client, i, p) for i, p in enumerate(PROMPTS)))

    return asyncio.run(main())


@pytest.mark.parametrize("family", ["llama3", "llama4", "gemma3", "mllama"])
def test_concurrent_greedy_over_http_equals_plain_generate(family):
    model = _model(family)
    plain = [model.complete(p, max_tokens=N, temperature=0).text for p in PROMPTS]
    for spec in ({"speculative": "ngram", "num_speculative_tokens": 4},
                 {"draft": _near_copy(model), "num_speculative_tokens": 3}):
        served = ServedModel(model, f"tiny-{family}", kv_cache_bytes=16 << 20, block_size=4, **spec)
        server = LiveServer(served)
        try:
            assert _complete_all(server.url) == plain, (family, list(spec))
        finally:
            server.stop()
        stats = served.engine.stats
        assert stats["peak_decode_batch"] > 1, "the requests did not share a batch"
        assert stats["spec_proposed"] > 0, "nothing was proposed"
        if "draft" in spec:  # the near copy's proposals are kept, at least some (prompt lookup's may all be rejected)
            assert stats["spec_accepted"] > 0, stats
        assert served.engine.cache.num_free == served.engine.cache.num_blocks
