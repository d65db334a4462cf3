import math

import pytest
import torch

from select2think import S2TError
from select2think.decoding.selectors import LLMArgmax, LLMRestrictedArgmax, Sampler, SLMTop1
from select2think.decoding.triggers import EntropyTrigger, KLTrigger, MarginTrigger, RandomTrigger, make_trigger


def logp(rows):
    return torch.tensor(rows, dtype=torch.float32).log()


def test_kl_matches_hand_computation_on_top_support():
    s = logp([[0.5, 0.3, 0.2]])
    llm = logp([[0.2, 0.3, 0.5]])
    expected = sum(p * math.log(p / q) for p, q in zip([0.5, 0.3, 0.2], [0.2, 0.3, 0.5], strict=True))
    assert KLTrigger().statistic(s, llm).item() == pytest.approx(expected, rel=1e-5)
    reverse = sum(q * math.log(q / p) for p, q in zip([0.5, 0.3, 0.2], [0.2, 0.3, 0.5], strict=True))
    assert KLTrigger(reverse=True).statistic(s, llm).item() == pytest.approx(reverse, rel=1e-5)
    assert KLTrigger().statistic(s, s).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_renormalises_on_slm_top64_and_drops_llm_zeros():
    V = 100
    s = torch.full((1, V), 1e-4)
    s[0, :64] = (1 - 36e-4) / 64
    llm = s.clone()
    llm[0, 70] = 0.5  # outside the SLM's top-64: ignored
    llm[0, 0] = 0.0  # p_L = 0: dropped
    llm = llm / llm.sum()
    stat = KLTrigger().statistic(s.log(), llm.log())
    assert torch.isfinite(stat).all() and stat.item() == pytest.approx(0.0, abs=1e-5)


def test_entropy_and_margin():
    uniform = torch.full((1, 64), 1 / 64).log()
    assert EntropyTrigger().statistic(uniform).item() == pytest.approx(math.log(64), rel=1e-5)
    peaked = logp([[0.9, 0.05, 0.05]])
    assert MarginTrigger().statistic(peaked).item() == pytest.approx(1 - 0.85, rel=1e-5)


def test_statistics_from_recorded_features_equal_the_live_ones():
    """`s2t regroup` computes SLM-only triggers from features/ITEM.npz: the same numbers as decoding."""
    from select2think.decoding.triggers import LearnedTrigger, statistic_from_features, step_features

    g = torch.Generator().manual_seed(0)
    slm_logp = torch.log_softmax(3 * torch.randn(20, 100, generator=g), -1)
    hidden = torch.randn(20, 6, generator=g)
    feats = step_features(slm_logp)
    learned = LearnedTrigger(torch.randn(16, generator=g), torch.tensor(0.1), torch.zeros(16), torch.ones(16))
    for trig in (EntropyTrigger(), MarginTrigger(), learned):
        live = trig.statistic(slm_logp, hidden=hidden)
        assert torch.allclose(statistic_from_features(trig, feats, hidden), live, atol=1e-5)
    with pytest.raises(S2TError, match="kl"):
        statistic_from_features(KLTrigger(), feats)
    with pytest.raises(S2TError, match="hidden"):
        statistic_from_features(learned, feats)


def test_random_trigger_is_keyed_not_stateful():
    t = RandomTrigger(seed=3)
    x = torch.zeros(3, 5)
    a = t.statistic(x, None, [(0, 1), (0, 2), (1, 1)])
    b = t.statistic(x[:1], None, [(0, 2)])
    assert a[1] == b[0] and a[0] != a[1]


def test_make_trigger_rejects_unknown():
    with pytest.raises(S2TError, match="unknown trigger 'nope'"):
        make_trigger("nope")


def test_restricted_argmax_stays_in_slm_topk_and_breaks_ties_by_slm_rank():
    s = logp([[0.4, 0.3, 0.2, 0.1]])
    llm = logp([[0.1, 0.1, 0.1, 0.7]])
    assert LLMArgmax().select(s, llm).item() == 3
    assert LLMRestrictedArgmax(k=3).select(s, llm).item() == 0  # tie among top-3: higher SLM rank wins
    l2 = logp([[0.1, 0.2, 0.3, 0.4]])
    assert LLMRestrictedArgmax(k=3).select(s, l2).item() == 2
    assert SLMTop1().select(s).item() == 0


def test_sampler_is_seeded_per_key_and_validates():
    s = torch.randn(2, 50).log_softmax(-1)
    a = Sampler(0.7, 0.95, seed=1).select(s, None, [(0, 0), (1, 0)])
    b = Sampler(0.7, 0.95, seed=1).select(s, None, [(0, 0), (1, 0)])
    assert torch.equal(a, b)
    with pytest.raises(S2TError):
        Sampler(temperature=0)
    with pytest.raises(S2TError):
        Sampler(top_p=1.5)


@pytest.mark.parametrize("spread", [0.3, 30.0])  # a peaked row (nucleus inside the top-256) and a flat one (not)
def test_sampler_draws_from_the_exact_nucleus(spread):
    torch.manual_seed(0)
    logits = torch.randn(1, 2000) * (1 / spread) * 10
    sampler = Sampler(0.7, 0.9, seed=2)
    probs = (logits.log_softmax(-1) / 0.7).softmax(-1)[0]
    sorted_p, order = probs.sort(descending=True)
    nucleus = order[(sorted_p.cumsum(-1) - sorted_p) < 0.9]
    assert (len(nucleus) > 256) == (spread > 1)  # both the top-256 path and the full-sort fallback run
    n = 6000
    draws = sampler.select(logits.log_softmax(-1).expand(n, -1), None, [(i, 0) for i in range(n)])
    assert set(draws.tolist()) <= set(nucleus.tolist())  # nothing outside the nucleus
    expected = probs[nucleus] / probs[nucleus].sum()
    counts = torch.bincount(draws, minlength=2000)[nucleus].float() / n
    top = expected.argsort(descending=True)[:5]  # the likeliest tokens' frequencies match the renormalised p
    assert torch.allclose(counts[top], expected[top], atol=4 * (expected[top] / n).sqrt().max().item() + 1e-3)
