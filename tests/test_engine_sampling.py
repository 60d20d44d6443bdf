"""Sampler transforms: exact distributions after each control, computed by hand here on small vectors."""

import math

import pytest
import torch

from llamaherd.engine import SamplingError, SamplingParams, make_sampler
from llamaherd.engine.sampling import resolve_stop_ids

# Probabilities chosen so every filter has an unambiguous answer: p = [0.5, 0.2, 0.15, 0.1, 0.05].
P = [0.5, 0.2, 0.15, 0.1, 0.05]
LOGITS = torch.tensor([[math.log(p) for p in P]])


def dist(**kw):
    """The (V,) distribution a non-greedy draw samples from, under these params."""
    sampler = make_sampler(SamplingParams(**kw), vocab_size=LOGITS.shape[1])
    return sampler.probabilities(LOGITS.clone())[0]


def renorm(keep):
    """Hand computation: probabilities P restricted to `keep`, renormalised."""
    total = sum(P[i] for i in keep)
    return torch.tensor([P[i] / total if i in keep else 0.0 for i in range(len(P))])


def close(a, b):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=torch.float32), atol=1e-6, rtol=0)


def test_no_controls_is_softmax():
    close(dist(), P)


def test_temperature():
    # p_i^(1/T) / sum_j p_j^(1/T)
    for t in (0.5, 2.0):
        w = [p ** (1 / t) for p in P]
        close(dist(temperature=t), [x / sum(w) for x in w])


def test_top_k():
    close(dist(top_k=1), renorm({0}))
    close(dist(top_k=3), renorm({0, 1, 2}))
    close(dist(top_k=10), P)


def test_top_p():
    # cumulative: 0.5, 0.7, 0.85, 0.95, 1.0; keep up to and including the token that reaches p.
    close(dist(top_p=0.45), renorm({0}))
    close(dist(top_p=0.6), renorm({0, 1}))
    close(dist(top_p=0.8), renorm({0, 1, 2}))
    close(dist(top_p=0.9), renorm({0, 1, 2, 3}))
    close(dist(top_p=0.01), renorm({0}))


def test_min_p():
    # threshold = min_p * 0.5
    close(dist(min_p=0.29), renorm({0, 1, 2}))  # threshold 0.145: 0.15 kept, 0.1 not
    close(dist(min_p=0.5), renorm({0}))  # 0.25: only 0.5 survives
    close(dist(min_p=0.19), renorm({0, 1, 2, 3}))  # 0.095


def test_typical_p():
    # Hand computation of locally typical sampling (Meister et al. 2022): entropy H, distance |-log p - H|.
    H = -sum(p * math.log(p) for p in P)
    d = [abs(-math.log(p) - H) for p in P]
    order = sorted(range(len(P)), key=lambda i: d[i])
    for mass in (0.15, 0.3, 0.6, 0.9):  # away from exact cumulative sums, where float rounding decides
        keep, acc = set(), 0.0
        for i in order:
            keep.add(i)
            acc += P[i]
            if acc >= mass:
                break
        close(dist(typical_p=mass), renorm(keep))
    # H = 1.3323; distances: 0.639, 0.277, 0.565, 0.970, 1.663 -> ranking 1, 2, 0, 3, 4
    assert order == [1, 2, 0, 3, 4]
    close(dist(typical_p=0.3), renorm({1, 2}))


def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    s = make_sampler(SamplingParams(repetition_penalty=2.0), 4)
    # tokens 0 and 1 seen; 2.0/2 = 1.0, -1.0*2 = -2.0; others unchanged.
    expect = torch.softmax(torch.tensor([[1.0, -2.0, 0.5, -3.0]]), -1)
    close(s.probabilities(logits, context=[[0, 1, 1]], generated=[[]]), expect)


def test_repetition_penalty_window():
    logits = torch.tensor([[2.0, 2.0, 2.0]])
    s = make_sampler(SamplingParams(repetition_penalty=2.0, penalty_last_n=1), 3)
    # only the last token (2) of the context is in the window
    close(s.probabilities(logits, context=[[0, 1, 2]], generated=[[]]),
          torch.softmax(torch.tensor([[2.0, 2.0, 1.0]]), -1))


def test_presence_and_frequency_penalties_follow_openai_formula():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    s = make_sampler(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), 4)
    # generated counts: token0 x3, token2 x1 -> mu -= c*0.25 + [c>0]*0.5
    expect = torch.softmax(torch.tensor([[1.0 - 0.75 - 0.5, 1.0, 1.0 - 0.25 - 0.5, 1.0]]), -1)
    # prompt tokens (context) do not count for OpenAI penalties
    close(s.probabilities(logits, context=[[1, 1, 0, 0, 0, 2]], generated=[[0, 0, 0, 2]]), expect)


def test_logit_bias():
    close(dist(logit_bias={4: math.log(10.0), 0: -100}),
          torch.softmax(torch.tensor([math.log(P[0]) - 100] + [math.log(p) for p in P[1:4]]
                                     + [math.log(P[4] * 10)]), -1))


def test_greedy_applies_penalties_and_bias():
    s = make_sampler(SamplingParams(temperature=0, logit_bias={3: 10.0}), 5)
    assert s(LOGITS).tokens.tolist() == [3]
    s = make_sampler(SamplingParams(temperature=0), 5)
    assert s(LOGITS).tokens.tolist() == [0]
    s = make_sampler(SamplingParams(temperature=0, repetition_penalty=100.0), 5)
    # log(0.5) * 100 is far below log(0.2)
    assert s(LOGITS, context=[[0]]).tokens.tolist() == [1]


def test_composition_order_temperature_then_top_p():
    # temperature 0.5 squares probabilities: 0.25, 0.04, 0.0225, 0.01, 0.0025 (sum 0.325) -> first
    # normalised 0.769 >= 0.7, so top_p=0.7 keeps only token 0 (without temperature it would keep two).
    close(dist(temperature=0.5, top_p=0.7), renorm({0}))
    close(dist(top_p=0.7), renorm({0, 1}))


def test_seeded_sampling_is_reproducible_and_follows_distribution():
    logits = torch.log(torch.tensor([P] * 4))
    a = [make_sampler(SamplingParams(seed=7), 5)(logits).tokens.tolist() for _ in range(2)]
    assert a[0] == a[1]
    draws = make_sampler(SamplingParams(seed=1), 5)
    counts = torch.zeros(5)
    big = torch.log(torch.tensor([P] * 4000))
    for t in draws(big).tokens.tolist():
        counts[t] += 1
    freq = counts / counts.sum()
    torch.testing.assert_close(freq, torch.tensor(P), atol=0.03, rtol=0)  # 4000 draws: sd ~ 0.008
    k2 = make_sampler(SamplingParams(seed=1, top_k=2), 5)(big).tokens
    assert set(k2.tolist()) == {0, 1}


def test_logprobs_are_raw_model_logprobs():
    s = make_sampler(SamplingParams(temperature=0, logprobs=True, top_logprobs=2, top_k=1), 5)
    out = s(LOGITS)
    assert out.logprobs.item() == pytest.approx(math.log(0.5), abs=1e-6)
    assert out.top_ids.tolist() == [[0, 1]]
    torch.testing.assert_close(out.top_logprobs, torch.tensor([[math.log(0.5), math.log(0.2)]]))


# A grammar mask (-inf) on the last token: the extremes below must keep it impossible and produce no NaN.
MASKED = torch.tensor([[math.log(p) for p in P[:-1]] + [float("-inf")]])


def masked_dist(**kw):
    return make_sampler(SamplingParams(**kw), vocab_size=len(P)).probabilities(MASKED.clone(), context=[[0, 3]])[0]


def test_huge_finite_temperature_is_uniform_over_the_allowed_tokens_not_nan():
    # 1e308 is inf in float32 and -inf / inf is NaN: the limit T -> inf is uniform over the tokens left
    for t in (1e308, 1e38, 1e31):
        close(masked_dist(temperature=t), [0.25, 0.25, 0.25, 0.25, 0.0])


def test_tiny_temperature_is_the_argmax_not_nan():
    # logits / 1e-320 overflow to inf (inf - inf is NaN in softmax): the limit T -> 0 is the argmax
    for t in (1e-320, 5e-324, 1e-40):
        close(masked_dist(temperature=t), [1.0, 0.0, 0.0, 0.0, 0.0])
    assert make_sampler(SamplingParams(temperature=1e-320, seed=0), 5)(MASKED.clone()).tokens.tolist() == [0]


def test_extreme_repetition_penalties_stay_finite():
    # seen tokens 0 (p=0.5) and 3 (p=0.1), both logits negative: multiplied by the penalty
    tiny = masked_dist(repetition_penalty=1e-300)  # 0 and 3's logits go to 0 (weight 1), the others keep p
    close(tiny, [1 / 2.35, 0.2 / 2.35, 0.15 / 2.35, 1 / 2.35, 0.0])
    huge = masked_dist(repetition_penalty=1e308)  # 0 and 3 become impossible: the others renormalised
    close(huge, [0.0, 0.2 / 0.35, 0.15 / 0.35, 0.0, 0.0])


def test_seed_outside_the_generator_range_is_a_sampling_error():
    for seed in (2**64, -(2**63) - 1):
        with pytest.raises(SamplingError, match="seed"):
            SamplingParams(seed=seed)
    make_sampler(SamplingParams(seed=2**64 - 1), 5)  # the edges are accepted
    make_sampler(SamplingParams(seed=-(2**63)), 5)


@pytest.mark.parametrize("kw", [
    dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=2), dict(top_k=-3), dict(typical_p=0),
    dict(repetition_penalty=0), dict(presence_penalty=3), dict(frequency_penalty=float("nan")),
    dict(logit_bias={"a": 1}), dict(max_tokens=-2), dict(stop=[""]), dict(top_logprobs=50),
    dict(temperature=float("inf")),
])
def test_bad_params_raise_naming_the_field(kw):
    with pytest.raises(SamplingError) as e:
        SamplingParams(**kw)
    assert next(iter(kw)) in str(e.value)


def test_logit_bias_outside_vocab_and_unknown_names():
    with pytest.raises(SamplingError, match="outside the vocabulary"):
        make_sampler(SamplingParams(logit_bias={99: 1.0}), 5)
    with pytest.raises(SamplingError, match="unknown sampling parameter 'topk'"):
        SamplingParams.from_kwargs(topk=3)


def test_from_kwargs_uses_checkpoint_defaults_and_aliases():
    from llamaherd.config import GenerationDefaults

    d = GenerationDefaults(temperature=0.6, top_p=0.9, eos_token_ids=(5, 6))
    p = SamplingParams.from_kwargs(d, num_predict=-1, repeat_penalty=1.1, repeat_last_n=64)
    assert (p.temperature, p.top_p, p.max_tokens, p.repetition_penalty, p.penalty_last_n) == (0.6, 0.9, None, 1.1, 64)
    assert SamplingParams.from_kwargs(d, temperature=0).temperature == 0
    assert resolve_stop_ids(p, None, d, extra=[9]) == {5, 6, 9}
    assert resolve_stop_ids(p.replace(ignore_eos=True), None, d) == frozenset()
    assert hash(p) == hash(p.replace())
