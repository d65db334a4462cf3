"""S2T-Local decoding: no LLM. At a triggered step the SLM's top-K candidates are scored by the
reserved-token head in one tree forward against the prefix cache; the winner's cache slot and its
next-token logits are kept, so the following step needs no extra forward.

`fast=False` is the specification: candidates re-scored with K full prefix forwards (as the
reference code does), then the chosen token fed normally.
"""

from __future__ import annotations

import time

import torch

from ..backends import HFBackend
from .policy import Policy
from .state import DecodeStats, RowState, active_view, commit_step, left_pad, totals
from .local_scorer import naive_scores, score_from_logits


def decode_local(model, vocab_size, banned, reserved, prompts, policy: Policy, make_row, row_seeds, pad_id,
                 k: int, fast: bool = True) -> tuple[list[RowState], DecodeStats]:
    t0 = time.perf_counter()
    B = len(prompts)
    slm = HFBackend(model, vocab_size, banned)
    slm.reset(B)
    slm.want_hidden = policy.trigger.needs_hidden
    rows = [make_row() for _ in range(B)]
    ids, live = left_pad(prompts, pad_id)
    s_logits = slm.extend(ids, live)[:, -1]
    hidden = slm.last_hidden[:, -1] if slm.want_hidden else None
    history = [list(p) for p in prompts]
    while (view := active_view(rows, s_logits, row_seeds)) is not None:
        active, s_lp = view.active, view.slm_logp
        fired, _ = policy.fire(s_lp, None, view.steps, view.keys,
                               hidden=hidden[view.idx] if hidden is not None else None)
        tokens = policy.base.select(s_lp, None, view.keys).clone()
        cands = s_lp.topk(k, dim=-1).indices
        new_logits = None
        if fired.any() and fast:
            feed = torch.full((B, k), pad_id, dtype=torch.long)
            feed_live = torch.zeros((B, k), dtype=torch.bool)
            for j, r in enumerate(active):
                if fired[j]:
                    feed[r], feed_live[r] = cands[j].cpu(), True
                else:
                    feed[r, 0], feed_live[r, 0] = int(tokens[j]), True
            base_slot = slm.num_slots
            raw = slm.extend_tree(feed, feed_live)
            scores = score_from_logits(raw, reserved)  # [B, K]
            text = slm.text_logits(raw)
            new_logits = s_logits.clone()
            new_hidden = hidden.clone() if hidden is not None else None
            for j, r in enumerate(active):
                pick = int(scores[r].argmax()) if fired[j] else 0
                if fired[j]:
                    tokens[j] = cands[j, pick]
                slm.accept_tree(r, base_slot + pick)
                new_logits[r] = text[r, pick]
                if new_hidden is not None:
                    new_hidden[r] = slm.last_hidden[r, pick]
        elif fired.any():
            for j, r in enumerate(active):
                if fired[j]:
                    sc = naive_scores(model, history[r], cands[j].tolist(), reserved)
                    tokens[j] = cands[j, int(sc.argmax())]
        for j, r in enumerate(active):
            history[r].append(int(tokens[j]))
        feed, mask = commit_step(rows, view, tokens, fired, tokens != s_lp.argmax(-1), None, pad_id)
        if new_logits is not None:
            s_logits, hidden = new_logits, new_hidden  # the tree forward already advanced every active row
            continue
        if not mask.any():
            break
        new = slm.extend(feed, mask)[:, -1]
        s_logits = torch.where(mask.to(new.device), new, s_logits)
        if hidden is not None:
            hidden = torch.where(mask.to(new.device), slm.last_hidden[:, -1], hidden)
    stats = DecodeStats(slm_forwards=slm.forwards, slm_tokens=slm.tokens)
    return rows, totals(rows, stats, t0, slm, None)
