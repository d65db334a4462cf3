"""The reserved-token score head: score(c) = softmax(reserved logits at c's position) . linspace(0, 1, 16).

A selector may add a prior: pick argmax_c score(c) + w * log p_SLM(c | prefix). With w equal to the training
temperature, the softmax the loss sees starts as the SLM's own distribution over its top-K, so an untrained
head (all reserved rows alike, every score 0.5) selects exactly what greedy would and training only has to
learn where to overrule the SLM. w = 0 is the paper's head alone."""

from __future__ import annotations

import torch

from ..errors import S2TError


def score_from_logits(raw_logits: torch.Tensor, reserved_ids) -> torch.Tensor:
    """Scores in [0, 1] from raw logits [..., V_all] (all output rows, reserved ones included)."""
    ids = torch.as_tensor(reserved_ids, device=raw_logits.device)
    probs = raw_logits.index_select(-1, ids).float().softmax(-1)
    levels = torch.linspace(0, 1, len(reserved_ids), device=raw_logits.device)
    return probs @ levels


def with_prior(scores: torch.Tensor, cand_logp: torch.Tensor, prior_weight: float) -> torch.Tensor:
    """What the winner is picked by: head scores [..., K] plus `prior_weight` x the candidates' SLM log-probs."""
    return scores if not prior_weight else scores + prior_weight * cand_logp.to(scores.device, scores.dtype)


def require_reserved(pair) -> tuple[int, ...]:
    if not pair.reserved_ids:
        raise S2TError(f"{pair.slm_name} has no 16 unused rows or special tokens to reserve for S2T-Local")
    return pair.reserved_ids


@torch.no_grad()
def naive_scores(model, prefix_ids: list[int], candidates: list[int], reserved_ids) -> torch.Tensor:
    """The paper's way, kept as the specification: K full forwards of prefix + candidate, no cache."""
    device = next(model.parameters()).device
    batch = torch.tensor([prefix_ids + [c] for c in candidates], device=device)
    raw = model(input_ids=batch).logits[:, -1].float()
    return score_from_logits(raw, reserved_ids)
