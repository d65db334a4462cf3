"""Recording what a decode saw at each committed step, for whoever asks (S2T-Local's collection).

A recorder is optional: without one the decode loops do no extra work. With one, every decode path that
supports it (the reference loop, draft and verify, the lazy LLM) calls `recorder.record(steps)` once per
batch of committed steps: a step enters only once its token is committed, so draft-and-verify's rejected
drafts never appear, and the corrected token's step carries the log-probs of the prefix it was chosen
from (the same prefix the draft was made from).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Steps:
    """N committed steps, one per entry (rows may repeat: draft and verify commits several steps of a row
    at once, in step order). Shapes: V = tokenizer size, H = the SLM's hidden size."""

    rows: list[int]  # batch rows (`generate`'s prompt index)
    steps: list[int]  # generation step of each entry (0 = the first generated token)
    tokens: list[int]  # the token committed there
    slm_logp: torch.Tensor  # [N, V] the SLM's log-probs the policy saw (banned ids at -inf)
    llm_logp: torch.Tensor | None  # [N, V] the LLM's, or None where the LLM did not run for these steps
    stat: torch.Tensor  # [N] the trigger statistic
    fired: torch.Tensor  # [N] bool: the trigger fired
    hidden: torch.Tensor | None  # [N, H] the SLM's final hidden state at the prefix (None unless asked for)


class StepRecorder(Protocol):
    """`wants_hidden`: ask the SLM's backend for its final hidden states (costs a little on every forward)."""

    wants_hidden: bool

    def record(self, steps: Steps) -> None: ...


class Offset:
    """A recorder seen by one batch of `generate`: batch rows become prompt indices."""

    def __init__(self, inner: StepRecorder, offset: int):
        self.inner, self.offset = inner, offset
        self.wants_hidden = inner.wants_hidden

    def record(self, steps: Steps) -> None:
        steps.rows = [r + self.offset for r in steps.rows]
        self.inner.record(steps)
