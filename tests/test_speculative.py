"""Speculative decoding is exact: greedy output token-identical to plain decoding for every family (n-gram
lookup and a draft model), and under sampling the verified tokens follow the target's own distribution (a
chi-square test against probabilities from full forwards; a broken acceptance rule fails the same test)."""

import collections

import pytest
import torch

from llamaherd.api import Model
from llamaherd.checkpoint.base import Checkpoint
from llamaherd.config import ModelConfig, VisionConfig
from llamaherd.engine import SamplingParams, make_sampler
from llamaherd.engine.generate import generate_tokens, greedy_reference
from llamaherd.engine.speculative import (AcceptanceTracker, DraftProposer, NgramProposer, SpeculativeError,
                                          make_proposer, speculative_tokens)

from .conftest import random_model
from .test_engine_generate import CONFIGS

# Every family: the Llama 2/3.x shapes, Gemma 3, Llama 4 (MoE) and Llama 3.2 Vision's decoder used text-only
# (its cross-attention layers are skipped without an image).
FAMILIES = {**CONFIGS, "mllama": ModelConfig(
    arch="mllama", dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, rope_theta=5e5,
    max_seq_len=512, vision=VisionConfig(image_size=28, patch_size=14, max_num_tiles=4, width=32, n_layers=2,
                                         n_global_layers=1, n_heads=4, intermediate_layers=(1,),
                                         n_cross_attention_layers=2))}


def _net(family, seed=0):
    return random_model(FAMILIES[family], seed=seed)


# A prompt that repeats itself, so prompt lookup has something to propose.
PROMPT = [1, 5, 9, 20, 5, 9, 20, 7, 5, 9, 20, 7, 3, 5, 9]


def _ids(steps):
    return [s.rows[0].id for s in steps]


def _draft_for(family):
    return _net(family, seed=1)  # another random model of the same shape and vocabulary


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("mode", ["ngram", "draft"])
def test_greedy_identical_to_plain_decoding(family, mode):
    net = _net(family).eval()
    n = 24 if family in ("gemma3", "llama4") else 40  # past Gemma's 16-token sliding window either way
    params = SamplingParams(max_tokens=n, temperature=0)
    plain = _ids(generate_tokens(net, [PROMPT], make_sampler(params, net.config.vocab_size)))
    proposer = NgramProposer() if mode == "ngram" else DraftProposer(_draft_for(family).eval())
    tracker = AcceptanceTracker(4)
    spec = _ids(speculative_tokens(net, PROMPT, make_sampler(params, net.config.vocab_size), proposer, k=4,
                                   tracker=tracker))
    assert spec == plain
    assert tracker.proposed > 0  # speculation did happen


def test_self_draft_accepts_everything_and_rolls_back():
    """The target drafting for itself: every proposal is kept under greedy; the result is still the reference."""
    net = _net("llama3").eval()
    params = SamplingParams(max_tokens=30, temperature=0)
    tracker = AcceptanceTracker(5)
    out = _ids(speculative_tokens(net, PROMPT, make_sampler(params, 256), DraftProposer(net), k=5, tracker=tracker))
    assert out == greedy_reference(net, PROMPT, 30)
    assert tracker.acceptance_rate == 1.0


def test_stops_and_logprobs_keep_their_meaning():
    net = _net("llama3").eval()
    plain_params = SamplingParams(max_tokens=30, temperature=0, logprobs=True, top_logprobs=3)
    plain = [s.rows[0] for s in generate_tokens(net, [PROMPT], make_sampler(plain_params, 256))]
    stop = {plain[7].id}  # end on the first time the 8th token comes up
    first = next(i for i, t in enumerate(plain) if t.id in stop)
    spec = [s.rows[0] for s in speculative_tokens(net, PROMPT, make_sampler(plain_params, 256), NgramProposer(), k=4,
                                                  stop_ids=frozenset(stop))]
    assert [t.id for t in spec] == [t.id for t in plain[: first + 1]]
    assert spec[-1].stop_token and spec[-1].finish_reason == "stop"
    for a, b in zip(spec, plain):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [i for i, _ in a.top_logprobs] == [i for i, _ in b.top_logprobs]
    spec = [s.rows[0] for s in speculative_tokens(net, PROMPT, make_sampler(plain_params.replace(max_tokens=9), 256),
                                                  NgramProposer(), k=4)]
    assert len(spec) == 9 and spec[-1].finish_reason == "length"


def test_penalties_and_bias_under_speculation():
    """Penalties depend on the history, drafts included: the verified output equals plain decoding."""
    net = _net("llama3.2").eval()
    params = SamplingParams(max_tokens=30, temperature=0, repetition_penalty=1.3, frequency_penalty=0.5,
                            logit_bias={9: 3.0})
    plain = _ids(generate_tokens(net, [PROMPT], make_sampler(params, 256)))
    for proposer in (NgramProposer(), DraftProposer(net)):
        assert _ids(speculative_tokens(net, PROMPT, make_sampler(params, 256), proposer, k=3)) == plain


def test_model_generate_keywords():
    net = _net("llama3").eval()
    model = Model(net, Checkpoint(net.config, {}, "tiny"))
    plain = model.complete(PROMPT, max_tokens=20, temperature=0).token_ids
    assert model.complete(PROMPT, max_tokens=20, temperature=0, speculative="ngram").token_ids == plain
    assert model.complete(PROMPT, max_tokens=20, temperature=0, draft=model, num_speculative_tokens=3).token_ids == plain
    with pytest.raises(SpeculativeError, match="ngram"):
        model.complete(PROMPT, max_tokens=2, speculative="medusa")
    with pytest.raises(SpeculativeError, match="num_speculative_tokens"):
        model.complete(PROMPT, max_tokens=2, speculative="ngram", num_speculative_tokens=0)


def test_draft_with_another_vocabulary_is_refused():
    from dataclasses import replace

    from llamaherd.model import build

    other = build(replace(CONFIGS["llama3"], vocab_size=300))
    with pytest.raises(SpeculativeError, match="vocabulary"):
        make_proposer(None, other, target_vocab=256)


# --------------------------------------------------------------------------------------------------------------
# The distribution under sampling
# --------------------------------------------------------------------------------------------------------------

TOP_K, TEMPERATURE, N_SAMPLES = 3, 1.3, 500


def _dist(net, ids):
    """The target's next-token distribution from a full forward (no cache), top-k and temperature written out here."""
    with torch.no_grad():
        logits = net(torch.tensor([ids]))[0, -1].float() / TEMPERATURE
    kth = torch.topk(logits, TOP_K).values[-1]
    return torch.softmax(logits.masked_fill(logits < kth, float("-inf")), -1)


def _target_joint(net, prompt):
    """P(second and third tokens), the first summed out. The first token comes from the prompt's prefill (no
    proposal to verify); the next two are where proposals are verified."""
    p1 = _dist(net, prompt)
    joint = collections.defaultdict(float)
    for a in torch.nonzero(p1)[:, 0].tolist():
        p2 = _dist(net, prompt + [a])
        for b in torch.nonzero(p2)[:, 0].tolist():
            for c, pc in enumerate(_dist(net, prompt + [a, b]).tolist()):
                if pc > 0:
                    joint[(b, c)] += float(p1[a]) * float(p2[b]) * pc
    return dict(joint)


def _chi_square_p(counts, expected_p, n):
    """p-value of observed counts against expected probabilities; a draw the target cannot make gives 0."""
    if any(pair not in expected_p for pair in counts):
        return 0.0
    stat = sum((counts.get(pair, 0) - n * p) ** 2 / (n * p) for pair, p in expected_p.items())
    dof = len(expected_p) - 1  # chi-square survival function: the regularized upper incomplete gamma Q(dof/2, x/2)
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def _always(p_x, q_x):  # broken: keep every proposal
    return 1.0


def _flatter(net):
    """A draft that proposes the target's top tokens with other probabilities: the target with its output
    weights halved (its logits halved, so the same top-k set, flatter inside it)."""
    import copy

    draft = copy.deepcopy(net)
    with torch.no_grad():
        draft.output_weight().mul_(0.5)
    return draft


class _FixedProposer:
    """A deterministic proposer (q one-hot, the case of n-gram lookup) that always proposes the same tokens, so
    that every sample has proposals to verify whatever its first token was (prompt lookup finds none after
    most first tokens of a random model)."""

    cost = 0.0

    def __init__(self, tokens):
        self.tokens = list(tokens)

    def propose(self, context, n_prompt, k, sampler):
        from llamaherd.engine.speculative import Proposal

        return Proposal(self.tokens[:k])

    def keep(self, n_tokens):
        pass


# The broken rule is shown failing with deterministic proposals; with the flattened draft, keeping every proposal
# drew a distribution too close to the target's for 500 samples to tell apart, so that pairing is not used.
@pytest.mark.parametrize("mode,broken", [("deterministic", None), ("deterministic", "always"), ("draft", None)])
def test_sampled_tokens_follow_the_target_distribution(mode, broken):
    net = _net("llama3").eval()
    expected = _target_joint(net, PROMPT)
    rule = {"accept": _always} if broken == "always" else {}
    draft = _flatter(net) if mode == "draft" else None
    likeliest = max(expected, key=expected.get)  # proposed every time: kept often, rejected often
    counts = collections.Counter()
    tracker = AcceptanceTracker(2)
    for seed in range(N_SAMPLES):
        params = SamplingParams(max_tokens=3, temperature=TEMPERATURE, top_k=TOP_K, seed=seed)
        proposer = _FixedProposer(likeliest) if draft is None else DraftProposer(draft)
        out = _ids(speculative_tokens(net, PROMPT, make_sampler(params, 256), proposer, k=2, tracker=tracker,
                                      **rule))
        counts[tuple(out[1:])] += 1
    assert tracker.proposed >= N_SAMPLES  # every sample had proposals to verify
    p_value = _chi_square_p(counts, expected, N_SAMPLES)
    if broken is None:
        assert p_value > 1e-3, (p_value, counts, expected)
    else:
        assert p_value < 1e-3, f"the broken rule {broken!r} went unnoticed (p={p_value})"
