"""S2T-Local decoding: no LLM. At a triggered step the SLM's top-K candidates are scored by the
reserved-token head in one tree forward against a prefix cache.

Two modes:
- coupled (the paper's): the adapted model generates and scores. When every active row fires (always
  at batch 1), the tree forward runs on the generation cache and the winner's slot and next-token
  logits are kept, so the following step needs no extra forward. When only some rows fire, those
  rows score their candidates on a view of their cache and the batch then extends by one token.
- decoupled: the base model generates (its answers stay the base model's between triggers) and the
  adapter only scores. The adapted model keeps its own cache, which lags behind and catches up in one
  multi-token forward per trigger (as the lazy LLM does), then scores the K candidates as a tree.

`fast=False` is the specification for both: candidates re-scored with K full prefix forwards of the
scoring model (as the reference code does), then the chosen token fed normally.
"""

from __future__ import annotations

import time

import torch

from ..backends import HFBackend
from ..errors import S2TError
from .local_scorer import naive_scores, score_from_logits, with_prior
from .policy import Policy
from .state import DecodeStats, RowState, active_view, commit_step, left_pad, totals


class AdapterOff:
    """A PEFT model seen with its adapter disabled: the decoupled mode's generator, sharing the weights."""

    def __init__(self, peft_model):
        if not hasattr(peft_model, "disable_adapter"):
            raise S2TError(
                "decoupled S2T-Local needs the selector loaded unmerged: apply_selector(pair, path, mode='decoupled')"
            )
        self.peft = peft_model
        self.config = peft_model.config

    def parameters(self):
        return self.peft.parameters()

    def __call__(self, **kwargs):
        with self.peft.disable_adapter():
            return self.peft(**kwargs)


class _LaggingScorer:
    """Decoupled mode's scoring side: the adapted model's cache, caught up only for rows that fire."""

    def __init__(self, model, vocab_size, banned, prompts, pad_id, reserved):
        self.backend = HFBackend(model, vocab_size, banned)
        self.backend.reset(len(prompts))
        self.pending = [list(p) for p in prompts]
        self.pad_id, self.reserved = pad_id, reserved

    def score(self, rows: list[int], cands: torch.Tensor) -> torch.Tensor:
        """Scores [len(rows), K] of each row's candidates [len(rows), K]; call `keep` with the winners."""
        B, K = len(self.pending), cands.shape[1]
        width = max(len(self.pending[r]) for r in rows)
        if width:
            ids = torch.full((B, width), self.pad_id, dtype=torch.long)
            live = torch.zeros((B, width), dtype=torch.bool)
            for r in rows:
                n = len(self.pending[r])
                ids[r, :n], live[r, :n] = torch.tensor(self.pending[r], dtype=torch.long), True
                self.pending[r] = []
            self.backend.extend(ids, live, logits=False)
        feed = torch.full((B, K), self.pad_id, dtype=torch.long)
        feed_live = torch.zeros((B, K), dtype=torch.bool)
        for j, r in enumerate(rows):
            feed[r], feed_live[r] = cands[j].cpu(), True
        self.tree_base = self.backend.num_slots
        raw = self.backend.extend_tree(feed, feed_live)
        return score_from_logits(raw[rows], self.reserved)

    def keep(self, row: int, pick: int) -> None:
        self.backend.accept_tree(row, self.tree_base + pick)

    def follow(self, row: int, token: int) -> None:
        """The base model emitted `token` on its own: the scorer sees it at its next catch-up."""
        self.pending[row].append(token)


def decode_local(
    model,
    vocab_size,
    banned,
    reserved,
    prompts,
    policy: Policy,
    make_row,
    row_seeds,
    pad_id,
    k: int,
    fast: bool = True,
    mode: str = "coupled",
    prior_weight: float = 0.0,
) -> tuple[list[RowState], DecodeStats]:
    """`mode` is one of config.LOCAL_MODES, validated by DecodeConfig; `prior_weight` is the selector's
    (local_scorer.with_prior): the generating model's log-probs of the candidates join their scores."""
    t0 = time.perf_counter()
    B = len(prompts)
    decoupled = mode == "decoupled"
    slm = HFBackend(AdapterOff(model) if decoupled else model, vocab_size, banned)
    slm.reset(B)
    slm.want_hidden = policy.trigger.needs_hidden
    scorer = _LaggingScorer(model, vocab_size, banned, prompts, pad_id, reserved) if decoupled and fast else None
    rows = [make_row() for _ in range(B)]
    ids, live = left_pad(prompts, pad_id)
    s_logits = slm.extend(ids, live, last_only=True)[:, -1]
    hidden = slm.last_hidden[:, -1] if slm.want_hidden else None
    history = [list(p) for p in prompts]
    while (view := active_view(rows, s_logits, row_seeds)) is not None:
        active, s_lp = view.active, view.slm_logp
        fired, _ = policy.fire(
            s_lp, None, view.steps, view.keys, hidden=hidden[view.idx] if hidden is not None else None
        )
        tokens = policy.base.select(s_lp, None, view.keys).clone()
        cands = s_lp.topk(k, dim=-1).indices
        cand_lp = s_lp.gather(-1, cands)
        new_logits = None
        if fired.any() and fast and not decoupled and not fired.all():
            # some rows fire: they alone score K candidates on a view of their cache, then every row
            # extends by its one chosen token below (scoring them all would cost K tokens per row)
            js = fired.nonzero().flatten().tolist()
            raw = slm.peek_tree([active[j] for j in js], cands[js])
            scores = with_prior(score_from_logits(raw, reserved), cand_lp[js], prior_weight)
            for n, j in enumerate(js):
                tokens[j] = cands[j, int(scores[n].argmax())]
        elif fired.any() and fast and not decoupled:
            feed = torch.full((B, k), pad_id, dtype=torch.long)
            feed_live = torch.zeros((B, k), dtype=torch.bool)
            for j, r in enumerate(active):
                if fired[j]:
                    feed[r], feed_live[r] = cands[j].cpu(), True
                else:
                    feed[r, 0], feed_live[r, 0] = int(tokens[j]), True
            base_slot = slm.num_slots
            raw = slm.extend_tree(feed, feed_live)
            scores = score_from_logits(raw, reserved)  # [B, K], rows by batch index r
            text = slm.text_logits(raw)
            new_logits = s_logits.clone()
            new_hidden = hidden.clone() if hidden is not None else None
            for j, r in enumerate(active):
                pick = int(with_prior(scores[r], cand_lp[j], prior_weight).argmax()) if fired[j] else 0
                if fired[j]:
                    tokens[j] = cands[j, pick]
                slm.accept_tree(r, base_slot + pick)
                new_logits[r] = text[r, pick]
                if new_hidden is not None:
                    new_hidden[r] = slm.last_hidden[r, pick]
        elif fired.any() and scorer is not None:
            js = fired.nonzero().flatten().tolist()
            scores = with_prior(scorer.score([active[j] for j in js], cands[js]), cand_lp[js], prior_weight)
            for n, j in enumerate(js):
                pick = int(scores[n].argmax())
                tokens[j] = cands[j, pick]
                scorer.keep(active[j], pick)
        elif fired.any():
            for j, r in enumerate(active):
                if fired[j]:
                    sc = with_prior(
                        naive_scores(model, history[r], cands[j].tolist(), reserved), cand_lp[j], prior_weight
                    )
                    tokens[j] = cands[j, int(sc.argmax())]
        for j, r in enumerate(active):
            history[r].append(int(tokens[j]))
            if scorer is not None and not fired[j]:
                scorer.follow(r, int(tokens[j]))
        feed, mask = commit_step(rows, view, tokens, fired, tokens != s_lp.argmax(-1), None, pad_id)
        finished = [r for r in active if rows[r].done]
        if finished:  # finished rows leave the batch: the rest decode as fast as a smaller batch
            slm.retire(finished)
            if scorer is not None:
                scorer.backend.retire(finished)
        if new_logits is not None:
            s_logits, hidden = new_logits, new_hidden  # the tree forward already advanced every active row
            continue
        if not mask.any():
            break
        new = slm.extend(feed, mask)[:, -1]
        s_logits = torch.where(mask.to(new.device), new, s_logits)
        if hidden is not None:
            hidden = torch.where(mask.to(new.device), slm.last_hidden[:, -1], hidden)
    stats = totals(rows, DecodeStats(slm_forwards=slm.forwards, slm_tokens=slm.tokens), t0, slm, None)
    if scorer is not None:  # the adapted model's forwards are SLM-sized work too: count them as SLM work
        sb = scorer.backend
        stats.slm_forwards += sb.forwards
        stats.slm_tokens += sb.tokens
        for i, r in enumerate(rows):
            r.gen.slm_forwards += sb.row_forwards[i]
            r.gen.slm_tokens += sb.row_tokens[i]
    return rows, stats
