"""A policy = trigger + selector for triggered steps + base chooser for the rest (config.POLICIES says which)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import S2TError
from .config import DecodeConfig
from .selectors import LLMArgmax, LLMRestrictedArgmax, Sampler, Selector, SLMTop1
from .triggers import Trigger, make_trigger


@dataclass
class Policy:
    trigger: Trigger
    selector: Selector  # used where the trigger fires
    base: Selector  # used everywhere else
    threshold: float
    warmup: int
    k: int

    @classmethod
    def from_config(cls, cfg: DecodeConfig, trigger: Trigger | None = None, head: Selector | None = None) -> Policy:
        """`trigger`: a ready trigger object (a learned head); `head`: S2T-Local's selector (ReservedHead)."""
        info = cfg.info
        base: Selector = Sampler(cfg.temperature, cfg.top_p, cfg.seed) if info.selector == "sample" else SLMTop1()
        selectors: dict[str, Selector | None] = {
            "llm-restricted-argmax": LLMRestrictedArgmax(cfg.k),
            "llm-argmax": LLMArgmax(),
            "reserved-head": head,
        }
        selector = selectors.get(info.selector, base)
        if selector is None:
            raise S2TError(f"policy {cfg.policy} needs a selector: apply_selector(pair, PATH) or --adapter PATH")
        if info.default_trigger == "never":  # greedy, sample, llm: nothing is examined
            trigger = make_trigger("never")
        trigger = trigger or make_trigger(cfg.trigger or info.default_trigger, cfg.reverse_kl, cfg.seed)
        threshold = cfg.threshold if cfg.threshold is not None else 0.0
        return cls(trigger, selector, base, threshold, cfg.warmup, cfg.k)

    @property
    def needs_llm(self) -> bool:
        return self.trigger.needs_llm or self.selector.needs_llm

    def fire(self, slm_logp, llm_logp, steps: torch.Tensor, keys, hidden=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(fired [N] bool, statistic [N]) for rows at generation steps `steps` [N]."""
        stat = self.trigger.statistic(slm_logp, llm_logp, keys, hidden=hidden if self.trigger.needs_hidden else None)
        return (stat > self.threshold) & (steps >= self.warmup), stat

    def choose(self, slm_logp, llm_logp, fired: torch.Tensor, keys, picks: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens [N]: the selector's where `fired`, else the base chooser's. `picks` [F]: the choices a
        selection-only LLM already made at the fired rows (in place of reading `llm_logp`)."""
        tokens = self.base.select(slm_logp, None, keys)
        if self.selector is self.base:
            return tokens
        if picks is None and self.selector.rowwise and (llm_logp is not None or not self.selector.needs_llm):
            return torch.where(fired, self.selector.select(slm_logp, llm_logp, keys), tokens)  # stays on the device
        idx = fired.nonzero().squeeze(-1)
        if idx.numel():
            tokens = tokens.clone()
            if picks is not None:
                tokens[idx] = picks.to(tokens.device)
            else:
                tokens[idx] = self.selector.select(slm_logp[idx], llm_logp[idx], [keys[i] for i in idx.tolist()])
        return tokens

    def full_llm_use(self, path: str) -> str | None:
        """What in this policy on execution `path` reads the LLM's logits rather than only its choice among
        the selector's candidates (None: nothing, so a selection-only LLM serves it)."""
        if self.trigger.needs_llm:
            return f"the {self.trigger.name} trigger"
        if self.selector.needs_llm and not self.selector.among_candidates:
            return f"the {self.selector.name} selector"
        if path != "lazy-llm":
            return "the reference loop (fast=False)"
        return None

    def hits(self, slm_logp, llm_logp) -> torch.Tensor:
        """Whether the LLM's full argmax is in the SLM's top-K, per row."""
        top = slm_logp.topk(self.k, dim=-1).indices
        return (top == llm_logp.argmax(-1, keepdim=True)).any(-1)
