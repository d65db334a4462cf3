"""Triggers decide which decoding steps are examined. Each maps log-probs to one statistic per row;
a step fires when the statistic exceeds a calibrated threshold.

Shapes: `slm_logp` and `llm_logp` are [N, V] log-probabilities (V = tokenizer size); the result is [N].
"""

from __future__ import annotations

import hashlib
import math

import torch

from ..errors import S2TError

TOP_SUPPORT = 64  # KL, entropy are computed on the SLM's top-64 ids, renormalised


class Trigger:
    name = "base"
    needs_llm = False
    needs_hidden = False  # wants the SLM's final hidden state [N, H] as `hidden`

    def statistic(
        self,
        slm_logp: torch.Tensor,
        llm_logp: torch.Tensor | None,
        keys: list | None = None,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One value per row [N]; `hidden` [N, H] is given to triggers that declare `needs_hidden`."""
        raise NotImplementedError


class NeverTrigger(Trigger):
    name = "never"

    def statistic(self, slm_logp, llm_logp=None, keys=None, hidden=None):
        return torch.full(slm_logp.shape[:1], -math.inf, device=slm_logp.device)


class AlwaysTrigger(Trigger):
    name = "always"

    def statistic(self, slm_logp, llm_logp=None, keys=None, hidden=None):
        return torch.full(slm_logp.shape[:1], math.inf, device=slm_logp.device)


def _top_support(slm_logp: torch.Tensor, k: int = TOP_SUPPORT):
    top_logp, top_ids = slm_logp.topk(min(k, slm_logp.shape[-1]), dim=-1)
    return top_logp.log_softmax(-1), top_ids


class KLTrigger(Trigger):
    """KL(p_S || p_L) on the SLM's top-64 ids, both renormalised there; ids with p_L <= 1e-12 dropped.

    `reverse=True` gives KL(p_L || p_S) on the same support.
    """

    name = "kl"
    needs_llm = True

    def __init__(self, reverse: bool = False):
        self.reverse = reverse

    def statistic(self, slm_logp, llm_logp=None, keys=None, hidden=None):
        if llm_logp is None:
            raise S2TError("the kl trigger needs the LLM's distribution")
        s, ids = slm_logp.topk(min(TOP_SUPPORT, slm_logp.shape[-1]), dim=-1)
        return self.on_support(s, llm_logp.gather(-1, ids))

    def on_support(self, s: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """The statistic [N] from the SLM's top-64 log-probs s [N, 64] and the LLM's log-probs q [N, 64] on
        the same ids (what `statistic` reads of the full distributions; collection stores only these)."""
        keep = q.exp() > 1e-12
        s = torch.where(keep, s, -math.inf).log_softmax(-1)
        q = torch.where(keep, q, -math.inf).log_softmax(-1)
        p, logp, logq = (q.exp(), q, s) if self.reverse else (s.exp(), s, q)
        terms = torch.where(keep, p * (logp - logq), torch.zeros_like(p))
        return terms.sum(-1)


class EntropyTrigger(Trigger):
    """Entropy of the SLM's renormalised top-64 distribution."""

    name = "entropy"

    def statistic(self, slm_logp, llm_logp=None, keys=None, hidden=None):
        logp, _ = _top_support(slm_logp)
        return -(logp.exp() * logp).nan_to_num(0.0).sum(-1)


class MarginTrigger(Trigger):
    """Small top-1/top-2 probability margins are uncertain steps: the statistic is 1 - margin."""

    name = "margin"

    def statistic(self, slm_logp, llm_logp=None, keys=None, hidden=None):
        top2 = slm_logp.topk(2, dim=-1).values.exp()
        return 1.0 - (top2[:, 0] - top2[:, 1])


class RandomTrigger(Trigger):
    """A seeded uniform draw per (row key, step): identical in every execution path."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def statistic(self, slm_logp, llm_logp=None, keys=None, hidden=None):
        if keys is None:
            raise S2TError("the random trigger needs per-row keys")
        vals = []
        for key in keys:
            digest = hashlib.blake2b(repr((self.seed, key)).encode(), digest_size=8).digest()
            vals.append(int.from_bytes(digest, "little") / 2**64)
        return torch.tensor(vals, device=slm_logp.device)


def step_features(slm_logp: torch.Tensor) -> torch.Tensor:
    """[N, 10]: top-64 entropy, top-1 minus top-2 probability, top-8 probabilities."""
    top8 = slm_logp.topk(8, dim=-1).values.exp()
    return torch.cat([EntropyTrigger().statistic(slm_logp)[:, None], (top8[:, 0] - top8[:, 1])[:, None], top8], dim=1)


class LearnedTrigger(Trigger):
    """A logistic head on SLM features (entropy, margin, top-8 probabilities, final hidden state),
    trained to predict the KL trigger (or the steps where S2T changes the token) without the LLM
    (local/trigger_head.py). The statistic is the head's logit."""

    name = "learned"
    needs_hidden = True

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, std: torch.Tensor):
        self.weight, self.bias, self.mean, self.std = weight, bias, mean, std

    def statistic(self, slm_logp, llm_logp=None, keys=None, hidden=None):
        if hidden is None:
            raise S2TError("the learned trigger needs the SLM's hidden state")
        return self.logit(torch.cat([step_features(slm_logp), hidden.float()], dim=1))

    def logit(self, x: torch.Tensor) -> torch.Tensor:
        """The head's logit on features [N, 10 + H]: step_features, then the final hidden state."""
        dev = x.device
        return ((x - self.mean.to(dev)) / self.std.to(dev)) @ self.weight.to(dev) + self.bias.to(dev)


TRIGGERS = {
    "never": NeverTrigger,
    "always": AlwaysTrigger,
    "kl": KLTrigger,
    "entropy": EntropyTrigger,
    "margin": MarginTrigger,
    "random": RandomTrigger,
}


def statistic_from_features(
    trigger: Trigger, features: torch.Tensor, hidden: torch.Tensor | None = None
) -> torch.Tensor:
    """An SLM-only trigger's statistic [N] from recorded `step_features` [N, 10] (and final hidden states
    [N, H] for the learned one): what `trigger.statistic` gives on the log-probs they were computed from
    (the learned one up to the rounding of hidden states stored in fp16, which it was trained on)."""
    if isinstance(trigger, LearnedTrigger):
        if hidden is None:
            raise S2TError("the learned trigger needs the SLM's hidden states, and none were recorded")
        return trigger.logit(torch.cat([features.float(), hidden.float()], dim=1))
    if isinstance(trigger, EntropyTrigger):
        return features[:, 0]
    if isinstance(trigger, MarginTrigger):
        return 1.0 - features[:, 1]
    raise S2TError(f"the {trigger.name} trigger's statistic cannot be computed from recorded SLM features")


def make_trigger(name: str, reverse_kl: bool = False, seed: int = 0) -> Trigger:
    if name == "learned":
        raise S2TError("the learned trigger is loaded from `s2t train-trigger`'s file: pass it as --threshold-file")
    if name not in TRIGGERS:
        raise S2TError(f"unknown trigger {name!r}: use one of {', '.join(TRIGGERS)}")
    if name == "kl":
        return KLTrigger(reverse=reverse_kl)
    if name == "random":
        return RandomTrigger(seed=seed)
    return TRIGGERS[name]()
