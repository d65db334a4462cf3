"""How much agreement with the LLM would S2T-Local need to beat greedy, and what do its wrong flips cost? S2T with
a simulated selector: where the LLM's pick among the SLM's top-8 differs from the SLM's top-1, it is taken at a
random fraction RATE of the triggered steps; where they agree, the SLM's second candidate is taken at a fraction
BREAK_RATE (a right top-1 broken); everywhere else the SLM's top-1. On groups where the top-1 agrees with the
LLM a fraction A0 of the time, its Agree@1 is A0 + RATE * (1 - A0) - BREAK_RATE * A0. The coin at a step is a
hash of (seed, item, step), so results do not depend on batching. Other settings are `s2t eval`'s.

    python benchmarks/noisy_oracle.py --rate 0.25 --threshold-file thr/learned-llama0.9.json \
        --shard 1/4 --out runs/noisy/r0.25      # then --shard 2/4; pair with greedy: benchmarks/paired_table.py
"""

from __future__ import annotations

import argparse

import torch

from select2think.decoding.policy import Policy
from select2think.decoding.selectors import LLMRestrictedArgmax, Selector
from select2think.decoding.triggers import RandomTrigger
from select2think.eval.report import write_report
from select2think.eval.runner import EvalConfig, run_eval


class Thinned(Selector):
    """The LLM's top-K selection at a fraction `rate` of the rows where it differs from the SLM's top-1; where it
    agrees, the SLM's second candidate at a fraction `break_rate` (a wrong flip); else the SLM's top-1."""

    needs_llm = True

    def __init__(self, inner: LLMRestrictedArgmax, rate: float, seed: int, break_rate: float = 0.0):
        self.inner, self.rate, self.break_rate = inner, rate, break_rate
        self.coin = RandomTrigger(seed)  # a uniform draw per (row key, step), the random trigger's
        self.name = f"s2t-thinned{rate:g}-break{break_rate:g}"

    def select(self, slm_logp, llm_logp=None, keys=None):
        draw = self.coin.statistic(slm_logp, keys=keys)
        top1 = slm_logp.argmax(-1)  # as SLMTop1 breaks ties
        second = slm_logp.scatter(-1, top1[:, None], float("-inf")).argmax(-1)
        llm = self.inner.select(slm_logp, llm_logp)
        agrees = llm == top1
        take = torch.where(agrees, draw < self.break_rate, draw < self.rate)
        return torch.where(take, torch.where(agrees, second, llm), top1)


def thinned(build, rate: float, seed: int, break_rate: float = 0.0):
    """`Policy.from_config` (`build`) with every S2T selector replaced by `Thinned`."""

    def from_config(cfg, trigger=None, head=None):
        pol = build(cfg, trigger, head)
        if isinstance(pol.selector, LLMRestrictedArgmax):
            pol.selector = Thinned(pol.selector, rate, seed, break_rate)
        return pol

    return from_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, required=True, help="fraction of triggered steps where the LLM selects")
    ap.add_argument("--break-rate", type=float, default=0.0, help="fraction of agreeing steps flipped to rank 2")
    ap.add_argument("--threshold-file", required=True, help="the trigger's thresholds (s2t calibrate)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dataset", default="gsm8k")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--shard", default="0/1")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--backend", default="llama.cpp")
    ap.add_argument("--coin-seed", type=int, default=0)
    args = ap.parse_args()
    for name, value in (("--rate", args.rate), ("--break-rate", args.break_rate)):
        if not 0 <= value <= 1:
            ap.error(f"{name} must be in [0, 1], got {value}")
    Policy.from_config = thinned(Policy.from_config, args.rate, args.coin_seed, args.break_rate)  # type: ignore[method-assign]
    cfg = EvalConfig(
        slm="qwen2.5-coder-0.5b-instruct",
        llm="qwen2.5-coder-1.5b-instruct",
        dataset=args.dataset,
        out=args.out,
        policies=[f"s2t={args.threshold_file}"],
        limit=args.limit,
        shard=args.shard,
        max_new_tokens=args.max_new_tokens,
        backend=args.backend,
        batch_size=args.batch_size,
    )
    run_eval(cfg)
    print(write_report(args.out))


if __name__ == "__main__":
    main()
