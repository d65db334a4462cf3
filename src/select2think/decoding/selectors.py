"""Selectors choose the token to emit at a step. Shapes: log-probs [N, V]; result ids [N]."""

from __future__ import annotations

import hashlib

import torch

from ..errors import S2TError


class Selector:
    name = "base"
    needs_llm = False
    among_candidates = False  # picks the LLM's favourite of `llm_candidates`: a selection-only LLM can answer it
    rowwise = False  # a row's answer depends on that row's log-probs alone (no keys, no host work): it may be
    # computed at every row and kept where a trigger fired, with no read-back of which rows fired

    def select(self, slm_logp: torch.Tensor, llm_logp: torch.Tensor | None, keys: list | None = None) -> torch.Tensor:
        raise NotImplementedError

    def llm_candidates(self, slm_logp: torch.Tensor) -> torch.Tensor:
        """The ids [N, K] the LLM chooses among (selectors with `among_candidates`)."""
        raise NotImplementedError


class SLMTop1(Selector):
    name = "slm-top1"
    rowwise = True

    def select(self, slm_logp, llm_logp=None, keys=None):
        return slm_logp.argmax(-1)


class LLMRestrictedArgmax(Selector):
    """S2T: the LLM's argmax over the SLM's top-K ids; ties go to the higher SLM rank."""

    name = "s2t"
    needs_llm = True
    among_candidates = True
    rowwise = True

    def __init__(self, k: int = 8):
        self.k = k

    def llm_candidates(self, slm_logp):
        return slm_logp.topk(self.k, dim=-1).indices  # [N, K] in SLM rank order

    def select(self, slm_logp, llm_logp=None, keys=None):
        cand = self.llm_candidates(slm_logp)
        best = llm_logp.gather(-1, cand).argmax(-1)  # first maximum = higher SLM rank
        return cand.gather(-1, best[:, None]).squeeze(-1)


class LLMArgmax(Selector):
    """Takeover: the LLM's full-vocabulary argmax."""

    name = "takeover"
    needs_llm = True
    rowwise = True

    def select(self, slm_logp, llm_logp=None, keys=None):
        return llm_logp.argmax(-1)


class Sampler(Selector):
    """Temperature / top-p sampling, seeded per (row key, step) so every execution path agrees."""

    name = "sample"

    def __init__(self, temperature: float = 0.7, top_p: float = 0.95, seed: int = 0):
        if temperature <= 0:
            raise S2TError(f"temperature must be > 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise S2TError(f"top_p must be in (0, 1], got {top_p}")
        self.temperature, self.top_p, self.seed = temperature, top_p, seed

    HEAD = 256  # the nucleus is looked for among the top-HEAD tokens first; rows whose top-HEAD holds
    # less than top_p of the mass fall back to a full sort (sorting 64 x 152k logits every step cost
    # more than the 0.5B's forward on a CPU)

    def select(self, slm_logp, llm_logp=None, keys=None):
        probs = (slm_logp / self.temperature).softmax(-1)
        head_p, head_i = probs.topk(min(self.HEAD, probs.shape[-1]), dim=-1)  # sorted, descending
        out = []
        for row, key in enumerate(keys):
            p, order = head_p[row], head_i[row]
            if float(p.sum()) < self.top_p:  # the nucleus reaches past the head: sort the whole row
                p, order = probs[row].sort(descending=True)
            keep = (p.cumsum(-1) - p) < self.top_p  # the smallest prefix reaching top_p
            digest = hashlib.blake2b(repr((self.seed, key)).encode(), digest_size=8).digest()
            gen = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") >> 1)
            choice = torch.multinomial(p[keep].float().cpu(), 1, generator=gen)
            out.append(order[keep][choice.to(order.device)])
        return torch.cat(out)
