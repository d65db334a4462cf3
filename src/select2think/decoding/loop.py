"""The reference loop: both models advance one token per step, as in the paper's code.

This is the executable specification. The fast paths in `fast.py` must emit the same tokens.
"""

from __future__ import annotations

import time

from ..backends.base import Backend
from .record import Steps
from .state import Batch, DecodeStats, RowState, active_view, commit_step, totals


def decode_reference(
    proposer: Backend, llm: Backend | None, batch: Batch, role: str = "slm"
) -> tuple[list[RowState], DecodeStats]:
    """Step-by-step decoding. `proposer` is the SLM (or, with `role="llm"`, the LLM decoding alone)."""
    t0 = time.perf_counter()
    policy = batch.policy
    rec = batch.recorder
    rows, s_logits = batch.start(proposer)
    hidden = batch.start_hidden(proposer)
    l_logits = batch.start(llm)[1] if llm is not None else None
    if role == "llm":
        roles: dict[str, list[Backend]] = {"llm": [proposer]}
    else:
        roles = {"slm": [proposer], "llm": [llm] if llm is not None else []}
    while True:
        if new := batch.admit(roles):  # continuous batching: newcomers join between steps
            s_logits, hidden = batch.join(proposer, new, s_logits, hidden)
            if llm is not None and l_logits is not None:
                l_logits = batch.join(llm, new, l_logits)[0]
        if (view := active_view(rows, s_logits, batch.row_seeds)) is None:
            break
        s_lp = view.slm_logp
        l_lp = l_logits[view.idx].log_softmax(-1) if l_logits is not None else None
        h = hidden[view.idx] if hidden is not None else None
        fired, stat = policy.fire(s_lp, l_lp, view.steps, view.keys, h)
        tokens = policy.choose(s_lp, l_lp, fired, view.keys)
        hits = policy.hits(s_lp, l_lp) if l_lp is not None else None
        if rec is not None:
            rec.record(Steps(view.active, view.steps.tolist(), tokens.tolist(), s_lp, l_lp, stat, fired, h))
        feed, live = commit_step(rows, view, tokens, fired, tokens != s_lp.argmax(-1), hits, batch.pad_id)
        finished = [r for r in view.active if rows[r].done]
        for b in (proposer, llm):  # finished rows leave the batch: the rest decode as a smaller batch would
            if b is not None and finished:
                b.retire(finished)
        if not live.any():
            continue  # every row finished: the next admit may bring newcomers, else the loop ends
        s_logits = batch.next_logits(proposer, feed, live)
        hidden = batch.next_hidden(proposer, live, hidden)
        if llm is not None:
            l_logits = batch.next_logits(llm, feed, live)
    return rows, totals(rows, t0, **roles)
