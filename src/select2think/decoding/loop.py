"""The reference loop: both models advance one token per step, as in the paper's code.

This is the executable specification. The fast paths in `fast.py` must emit the same tokens.
"""

from __future__ import annotations

import time

from ..backends import HFBackend
from .policy import Policy
from .state import DecodeStats, RowState, active_view, commit_step, left_pad, totals


def decode_reference(
    proposer, llm, tokenizer, vocab_size, banned, prompts, policy: Policy, make_row, row_seeds, pad_id
) -> tuple[list[RowState], DecodeStats]:
    """Step-by-step decoding. `proposer` is the SLM (or the LLM for the `llm` policy); `llm` may be None."""
    t0 = time.perf_counter()
    B = len(prompts)
    slm = HFBackend(proposer, vocab_size, banned)
    slm.reset(B)
    big = None
    if llm is not None:
        big = HFBackend(llm, vocab_size, banned)
        big.reset(B)
    rows = [make_row() for _ in range(B)]
    ids, live = left_pad(prompts, pad_id)
    s_logits = slm.extend(ids, live, last_only=True)[:, -1]
    l_logits = big.extend(ids, live, last_only=True)[:, -1] if big else None
    while (view := active_view(rows, s_logits, row_seeds)) is not None:
        s_lp = view.slm_logp
        l_lp = l_logits[view.idx].log_softmax(-1) if big else None
        fired, _ = policy.fire(s_lp, l_lp, view.steps, view.keys)
        tokens = policy.choose(s_lp, l_lp, fired, view.keys)
        hits = policy.hits(s_lp, l_lp) if l_lp is not None else None
        feed, feed_live = commit_step(rows, view, tokens, fired, tokens != s_lp.argmax(-1), hits, pad_id)
        if not feed_live.any():
            break
        finished = [r for r in view.active if rows[r].done]
        if finished:  # finished rows leave the batch: the rest decode as fast as a smaller batch
            slm.retire(finished)
            if big:
                big.retire(finished)
        s_logits = slm.extend(feed, feed_live)[:, -1]
        if big:
            l_logits = big.extend(feed, feed_live)[:, -1]
    stats = DecodeStats(slm_forwards=slm.forwards, slm_tokens=slm.tokens)
    if big:
        stats.llm_forwards, stats.llm_tokens = big.forwards, big.tokens
    return rows, totals(rows, stats, t0, slm, big)
