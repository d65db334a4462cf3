"""The reference loop: both models advance one token per step, as in the paper's code.

This is the executable specification. The fast paths in `fast.py` must emit the same tokens.
"""

from __future__ import annotations

import time

import torch

from ..backends import HFBackend
from .policy import Policy
from .state import DecodeStats, RowState, left_pad, totals


def _keys(row_seeds, rows, steps):
    return [(row_seeds[r], s) for r, s in zip(rows, steps)]


def decode_reference(proposer, llm, tokenizer, vocab_size, banned, prompts, policy: Policy, make_row,
                     row_seeds, pad_id) -> tuple[list[RowState], DecodeStats]:
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
    s_logits = slm.extend(ids, live)[:, -1]
    l_logits = big.extend(ids, live)[:, -1] if big else None
    while True:
        active = [r for r in range(B) if not rows[r].done]
        if not active:
            break
        idx = torch.tensor(active, device=s_logits.device)
        s_lp = s_logits[idx].log_softmax(-1)
        l_lp = l_logits[idx].log_softmax(-1) if big else None
        steps = torch.tensor([rows[r].step for r in active], device=s_lp.device)
        keys = _keys(row_seeds, active, steps.tolist())
        fired, _ = policy.fire(s_lp, l_lp, steps, keys)
        tokens = policy.choose(s_lp, l_lp, fired, keys)
        flips = tokens != s_lp.argmax(-1)
        hits = policy.hits(s_lp, l_lp) if l_lp is not None else None
        feed = torch.full((B, 1), pad_id, dtype=torch.long)
        feed_live = torch.zeros((B, 1), dtype=torch.bool)
        for j, r in enumerate(active):
            f = bool(fired[j])
            hit = bool(hits[j]) if (f and hits is not None) else None
            if not rows[r].commit(int(tokens[j]), f, bool(flips[j]), hit):
                feed[r, 0] = int(tokens[j])
                feed_live[r, 0] = True
        if not feed_live.any():
            break
        s_logits = slm.extend(feed, feed_live)[:, -1]
        if big:
            l_logits = big.extend(feed, feed_live)[:, -1]
    stats = DecodeStats(slm_forwards=slm.forwards, slm_tokens=slm.tokens)
    if big:
        stats.llm_forwards, stats.llm_tokens = big.forwards, big.tokens
    return rows, totals(rows, stats, t0, slm, big)
