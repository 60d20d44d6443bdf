"""Against Hugging Face transformers: each sampling transform equals its logits processor/warper on the same
logits, and greedy generation on converted weights equals `LlamaForCausalLM.generate(do_sample=False)`."""

import pytest
import torch

from llamaherd.engine import SamplingParams, make_sampler
from llamaherd.engine.generate import generate_tokens

from .conftest import TINY, random_model

lp = pytest.importorskip("transformers.generation.logits_process")


def hf_probs(logits, input_ids, *processors):
    x = logits.clone()
    for p in processors:
        x = p(input_ids, x)
    return torch.softmax(x, -1)


@pytest.fixture
def logits():
    return torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3


@pytest.mark.parametrize("kw,make", [
    (dict(temperature=0.7), lambda: [lp.TemperatureLogitsWarper(0.7)]),
    (dict(top_k=7), lambda: [lp.TopKLogitsWarper(7)]),
    (dict(top_p=0.8), lambda: [lp.TopPLogitsWarper(0.8)]),
    (dict(min_p=0.1), lambda: [lp.MinPLogitsWarper(0.1)]),
    (dict(typical_p=0.7), lambda: [lp.TypicalLogitsWarper(0.7)]),
    (dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05),
     lambda: [lp.TemperatureLogitsWarper(0.8), lp.TopKLogitsWarper(20), lp.TopPLogitsWarper(0.9),
              lp.MinPLogitsWarper(0.05)]),
])
def test_filters_match_transformers(logits, kw, make):
    ours = make_sampler(SamplingParams(**kw), 50).probabilities(logits)
    torch.testing.assert_close(ours, hf_probs(logits, torch.zeros(3, 1, dtype=torch.long), *make()),
                               atol=1e-6, rtol=0)


def test_repetition_penalty_matches_transformers(logits):
    ctx = torch.tensor([[1, 2, 2, 40], [5, 6, 7, 8], [0, 0, 0, 0]])
    ours = make_sampler(SamplingParams(repetition_penalty=1.3), 50).probabilities(logits, context=ctx.tolist())
    theirs = hf_probs(logits, ctx, lp.RepetitionPenaltyLogitsProcessor(1.3))
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_greedy_generation_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from llamaherd.checkpoint.base import Checkpoint
    from llamaherd.checkpoint.hf import write

    config = TINY["llama3.1"]
    net = random_model(config, seed=7)
    write(Checkpoint(config, net.state_dict(), tmp_path), tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    prompt = [[3, 14, 15, 92, 65, 35]]
    with torch.no_grad():
        theirs = hf.generate(torch.tensor(prompt), attention_mask=torch.ones(1, 6, dtype=torch.long),
                             do_sample=False, max_new_tokens=60, min_new_tokens=60, eos_token_id=None,
                             pad_token_id=0)[0, 6:].tolist()
    steps = generate_tokens(net, prompt, make_sampler(SamplingParams(temperature=0, max_tokens=60), 256))
    ours = [s.tokens[0] for s in steps]
    assert ours == theirs
