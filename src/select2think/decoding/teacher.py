"""Teacher forcing: one forward over a whole trajectory gives a model's distribution at every step.
Calibration, analysis and collection all read models' step distributions through this one function."""

from __future__ import annotations

import torch

from ..backends.base import Backend
from .vocab import Vocab


@torch.no_grad()
def step_logprobs(
    backend: Backend, prompt_ids: list[int], gen_ids: list[int], vocab: Vocab, hidden: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [len(gen_ids), vocab.size] the model gives each generated position (banned ids masked, as in
    decoding), and with `hidden` its final hidden states [len(gen_ids), H] there, in one forward."""
    backend.require("full_logits", "teacher forcing")
    backend.reset(1)
    backend.want_hidden = hidden
    ids = torch.tensor([prompt_ids + gen_ids])
    raw = backend.extend(ids, torch.ones_like(ids, dtype=torch.bool))
    assert raw is not None
    span = slice(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(gen_ids))
    h = backend.hidden()[0, span] if hidden else None
    backend.want_hidden = False
    backend.reset(0)
    return vocab.logprobs(raw[0, span]), h
