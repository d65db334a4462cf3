"""S2T-Local's score head: score(c) = softmax(reserved logits at c's position) . linspace(0, 1, 16), where the
16 reserved logits are the final hidden state at c times the 16 reserved rows [16, H].

A selector may add a prior: pick argmax_c score(c) + w * log p_SLM(c | prefix). With w equal to the training
temperature, the softmax the loss sees starts as the SLM's own distribution over its top-K, so an untrained
head (all reserved rows alike, every score 0.5) selects exactly what greedy would and training only has to
learn where to overrule the SLM. w = 0 is the paper's head alone. Training (local/train.py, head_only.py)
and decoding score with these same functions."""

from __future__ import annotations

import torch

from .selectors import Selector


def level_scores(reserved_logits: torch.Tensor) -> torch.Tensor:
    """Scores in [0, 1] [...] from the 16 reserved logits [..., 16]."""
    levels = torch.linspace(0, 1, reserved_logits.shape[-1], device=reserved_logits.device)
    return reserved_logits.float().softmax(-1) @ levels


def score_from_logits(raw_logits: torch.Tensor, reserved_ids) -> torch.Tensor:
    """Scores [...] from raw logits [..., V_all] whose reserved columns hold the head (training's layout)."""
    ids = torch.as_tensor(reserved_ids, device=raw_logits.device)
    return level_scores(raw_logits.index_select(-1, ids))


def reserved_scores(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Scores [...] from final hidden states [..., H] and the reserved rows [16, H] (fp32, as trained)."""
    return level_scores(hidden.float() @ rows.to(hidden.device, torch.float32).T)


def with_prior(scores: torch.Tensor, cand_logp: torch.Tensor, prior_weight: float) -> torch.Tensor:
    """What the winner is picked by: head scores [..., K] plus `prior_weight` x the candidates' SLM log-probs."""
    return scores if not prior_weight else scores + prior_weight * cand_logp.to(scores.device, scores.dtype)


def gated_pick(scores: torch.Tensor, gate: float = 0.0) -> torch.Tensor:
    """Index [...] of the winner among scores [..., K] of candidates in the SLM's rank order: the best, unless
    it leads candidate 0 (the SLM's own top-1) by no more than `gate`. A wrong overrule derails a trajectory
    as surely as a right one rescues it, so a selector overrules only when it is confident; gate 0 is the
    plain argmax (ties keep the SLM's top-1)."""
    best = scores.argmax(-1)
    lead = scores.gather(-1, best.unsqueeze(-1)).squeeze(-1) - scores[..., 0]
    return torch.where(lead > gate, best, torch.zeros_like(best))


class ReservedHead(Selector):
    """S2T-Local's selector: the SLM's top-K candidates scored by the reserved rows from each candidate's
    final hidden state (the engine scores the K siblings in one forward: `Backend.score_siblings`)."""

    name = "reserved-head"
    needs_candidates = True  # select() needs the candidates' hidden states [N, K, H]

    def __init__(self, rows: torch.Tensor, prior_weight: float = 0.0, k: int = 8, gate: float = 0.0):
        self.rows, self.prior_weight, self.k, self.gate = rows.float(), prior_weight, k, gate

    def candidates(self, slm_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [N, K], log-probs [N, K]) of the SLM's top-K, in rank order."""
        top_lp, top = slm_logp.topk(self.k, dim=-1)
        return top, top_lp

    def pick(self, cand_logp: torch.Tensor, cand_hidden: torch.Tensor) -> torch.Tensor:
        """Index [N] of the winning candidate, from log-probs [N, K] and hidden states [N, K, H]."""
        return gated_pick(with_prior(reserved_scores(cand_hidden, self.rows), cand_logp, self.prior_weight), self.gate)

    def select(self, slm_logp, llm_logp=None, keys=None, cand_hidden=None):
        top, top_lp = self.candidates(slm_logp)
        return top.gather(-1, self.pick(top_lp, cand_hidden)[:, None]).squeeze(-1)
