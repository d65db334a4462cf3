"""The reserved-token score head: score(c) = softmax(reserved logits at c's position) . linspace(0, 1, 16)."""

from __future__ import annotations

import torch

from ..errors import S2TError


def score_from_logits(raw_logits: torch.Tensor, reserved_ids) -> torch.Tensor:
    """Scores in [0, 1] from raw logits [..., V_all] (all output rows, reserved ones included)."""
    ids = torch.as_tensor(reserved_ids, device=raw_logits.device)
    probs = raw_logits.index_select(-1, ids).float().softmax(-1)
    levels = torch.linspace(0, 1, len(reserved_ids), device=raw_logits.device)
    return probs @ levels


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
