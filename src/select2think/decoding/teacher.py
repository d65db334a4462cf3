"""Teacher forcing: one forward over a whole trajectory gives a model's distribution at every step."""

from __future__ import annotations

import torch


@torch.no_grad()
def step_logprobs(
    model, prompt_ids: list[int], gen_ids: list[int], vocab_size: int, banned: tuple[int, ...] = ()
) -> torch.Tensor:
    """Log-probs [len(gen_ids), vocab_size] the model gives each generated position, in one forward."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + gen_ids], device=device)
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(gen_ids), :vocab_size]
    logits = logits.float()
    if banned:
        logits[:, list(banned)] = float("-inf")
    return logits.log_softmax(-1)
