"""benchmarks/noisy_oracle.py: S2T keeping the LLM's selection at a random fraction of its triggers."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import noisy_oracle
from select2think.decoding.api import generate
from select2think.decoding.config import DecodeConfig
from select2think.decoding.policy import Policy

PROMPTS = ["Tom has 3 apples and buys 5 more.", "What is 12 times 7?", "A train leaves at noon."]


def _ids(pair, policy: str) -> list[list[int]]:
    trigger = None if policy == "greedy" else "entropy"
    cfg = DecodeConfig(policy=policy, max_new_tokens=24, trigger=trigger, threshold=0.5)
    return [g.token_ids for g in generate(pair, PROMPTS, cfg, batch_size=2).generations]


def test_coin_is_fixed_by_seed_and_key():
    def coin(seed, key):  # the draw Thinned makes at a row
        return float(noisy_oracle.Thinned(None, 0.0, seed).coin.statistic(torch.zeros(1, 1), keys=[key])[0])

    assert coin(0, (7, 3)) == coin(0, (7, 3))
    draws = [coin(0, (7, s)) for s in range(2000)]
    assert all(0 <= d < 1 for d in draws) and 0.45 < sum(draws) / len(draws) < 0.55
    assert draws != [coin(1, (7, s)) for s in range(2000)]


def test_rate_zero_is_greedy_and_rate_one_is_s2t(tiny_pair, monkeypatch):
    greedy, s2t = _ids(tiny_pair, "greedy"), _ids(tiny_pair, "s2t")
    assert greedy != s2t  # the trigger fires and the LLM changes something, so the checks below can fail
    build = Policy.from_config
    out = {}
    for rate in (0.0, 0.5, 1.0):
        monkeypatch.setattr(Policy, "from_config", noisy_oracle.thinned(build, rate, seed=0))
        out[rate] = _ids(tiny_pair, "s2t")
    assert out[0.0] == greedy and out[1.0] == s2t
    assert out[0.5] not in (greedy, s2t)


@pytest.mark.parametrize("rate", ["-0.1", "1.5"])
def test_rate_outside_zero_one_is_refused(rate, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["noisy_oracle.py", "--rate", rate, "--threshold-file", "t.json", "--out", "o"])
    with pytest.raises(SystemExit) as e:
        noisy_oracle.main()
    assert e.value.code == 2 and "--rate must be in [0, 1]" in capsys.readouterr().err


def test_break_rate_flips_only_where_the_llm_agrees():
    from select2think.decoding.selectors import LLMRestrictedArgmax

    slm = torch.log_softmax(torch.tensor([[3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0]]), -1)
    llm = torch.log_softmax(torch.tensor([[5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 5.0, 0.0]]), -1)  # agrees, then differs
    keys = [(1, 0), (2, 0)]
    pick = noisy_oracle.Thinned(LLMRestrictedArgmax(4), rate=0.0, seed=0, break_rate=1.0).select(slm, llm, keys)
    assert pick.tolist() == [1, 0]  # the agreeing row breaks to rank 2; the differing one keeps the top-1
    pick = noisy_oracle.Thinned(LLMRestrictedArgmax(4), rate=1.0, seed=0, break_rate=0.0).select(slm, llm, keys)
    assert pick.tolist() == [0, 2]
