"""S2T-Local decoding: no LLM. At a triggered step the SLM's top-K candidates are scored by the reserved-row
head (`ReservedHead`) from their final hidden states, all K in one sibling forward against the prefix cache.

Two modes:
- coupled (the paper's): the adapted model generates and scores. When every active row fires (always at
  batch 1) the sibling forward runs on the generation cache and each row keeps its winner, whose next-token
  logits the forward already gave: the following step needs no extra forward. When only some rows fire,
  those rows score their candidates and the batch then extends by one token as usual.
- decoupled: the base model generates (its answers stay the base model's between triggers) and the adapted
  model only scores, from its own cache that lags behind and catches up in one forward per trigger.

`fast=False` is the specification for both: each candidate scored by a full forward of prefix + candidate
on a separate cache (as the paper's code does), then the chosen token fed normally.
"""

from __future__ import annotations

import time

import torch

from ..backends.base import Backend
from .lagging import LaggingCache
from .local_scorer import ReservedHead
from .state import Batch, DecodeStats, RowState, active_view, commit_step, totals


def naive_hidden(scratch: Backend, prefix: list[int], cands: list[int]) -> torch.Tensor:
    """Final hidden states [K, H] of prefix + each candidate, K full forwards (no shared cache)."""
    scratch.reset(len(cands))
    scratch.want_hidden = True
    ids = torch.tensor([[*prefix, c] for c in cands])
    scratch.extend(ids, torch.ones_like(ids, dtype=torch.bool), logits=False)
    return scratch.hidden()[:, -1]


class _Scoring:
    """Where candidates are scored: the generator itself (coupled), the adapted model's lagging cache
    (decoupled), or full prefix forwards on a scratch cache (the reference)."""

    def __init__(self, slm: Backend, scorer: Backend | None, batch: Batch, fast: bool):
        self.slm, self.fast = slm, fast
        self.lagging = LaggingCache(scorer, batch.prompts, batch.pad_id) if scorer is not None and fast else None
        self.scratch = (scorer or slm).spawn() if not fast else None
        self.history = [list(p) for p in batch.prompts]
        if self.lagging is not None:
            self.lagging.backend.want_hidden = True

    def score(self, rows: list[int], cands: torch.Tensor) -> tuple[bool, torch.Tensor | None, torch.Tensor]:
        """(whether the generator itself scored, so a winner can be kept; its raw logits [R, K, V] or None;
        hidden states [R, K, H]). An engine with `output_head` is asked for hidden states alone: the output
        head over K x V positions was most of a triggered step, and only the kept winner's row is needed."""
        if self.scratch is not None:
            hidden = [naive_hidden(self.scratch, self.history[r], c) for r, c in zip(rows, cands.tolist(), strict=True)]
            return False, None, torch.stack(hidden)
        if self.lagging is not None:
            self.lagging.sync(rows)
            self.lagging.backend.score_siblings(rows, cands, logits=False)
            return False, None, self.lagging.backend.hidden()
        raw = self.slm.score_siblings(rows, cands, logits=not self.slm.capabilities.output_head)
        return True, raw, self.slm.hidden()

    def advance(self, rows: list[int], tokens: list[int], picks: dict[int, int]) -> None:
        """Rows emitted `tokens`; `picks` are the rows that fired and the candidate they kept."""
        for r, t in zip(rows, tokens, strict=True):
            self.history[r].append(t)
            if self.lagging is not None and r not in picks:
                self.lagging.follow(r, t)
        if self.lagging is not None and picks:
            self.lagging.backend.keep_siblings(picks)

    def retire(self, rows: list[int]) -> None:
        if self.lagging is not None and rows:
            self.lagging.retire(rows)

    def admit(self, row: int, prompt: list[int]) -> None:
        """A newcomer takes the row (continuous batching)."""
        self.history[row] = list(prompt)
        if self.lagging is not None:
            self.lagging.admit(row, prompt)


def decode_local(
    slm: Backend, scorer: Backend | None, head: ReservedHead, batch: Batch, fast: bool = True
) -> tuple[list[RowState], DecodeStats]:
    """`scorer`: the adapted model in decoupled mode (then `slm` is the base model), else None."""
    t0 = time.perf_counter()
    policy = batch.policy
    slm.want_hidden = True  # the learned trigger reads the hidden state; coupled scoring reads the siblings'
    rows, s_logits = batch.start(slm)
    hidden = slm.hidden()[:, -1]
    scoring = _Scoring(slm, scorer, batch, fast)
    lagging = [scoring.lagging.backend] if scoring.lagging is not None else []
    roles = {"slm": [slm, *lagging]}  # the reference's scratch forwards are not costed
    while True:
        if new := batch.admit(roles):  # continuous batching: newcomers join between steps
            s_logits, joined = batch.join(slm, new, s_logits, hidden)
            assert joined is not None
            hidden = joined
            for r in new:
                scoring.admit(r, batch.prompts[r])
        if (view := active_view(rows, s_logits, batch.row_seeds)) is None:
            break
        active, s_lp = view.active, view.slm_logp
        fired, _ = policy.fire(s_lp, None, view.steps, view.keys, hidden=hidden[view.idx])
        tokens = policy.base.select(s_lp, None, view.keys).clone()
        js = fired.nonzero().flatten().tolist()
        picks: dict[int, int] = {}
        on_generator, raw = False, None
        if js:
            cands, cand_lp = head.candidates(s_lp[js])
            on_generator, raw, cand_hidden = scoring.score([active[j] for j in js], cands)
            won = head.pick(cand_lp, cand_hidden)
            tokens[js] = cands.gather(-1, won[:, None]).squeeze(-1).to(tokens.device)
            picks = {active[j]: w for j, w in zip(js, won.tolist(), strict=True)}
        kept = on_generator and len(js) == len(active)  # the sibling forward advanced every active row
        scoring.advance(active, tokens.tolist(), picks if scoring.lagging is not None else {})
        if kept:
            slm.keep_siblings(picks)
            n = torch.arange(len(js))
            s_logits = s_logits.clone()
            winner = raw[n, won] if raw is not None else slm.head_logits(cand_hidden[n, won])
            s_logits[view.idx] = batch.vocab.text_logits(winner)
            hidden = hidden.clone()
            hidden[view.idx] = cand_hidden[n, won].to(hidden.device)
        feed, live = commit_step(rows, view, tokens, fired, tokens != s_lp.argmax(-1), None, batch.pad_id)
        finished = [r for r in active if rows[r].done]
        if finished:  # finished rows leave the batch: the rest decode as fast as a smaller batch
            slm.retire(finished)
            scoring.retire(finished)
        if kept or not live.any():
            continue  # the siblings advanced every row, or every row finished
        got = batch.next_logits(slm, feed, live)
        s_logits = torch.where(live.to(got.device), got, s_logits)
        hidden = torch.where(live.to(got.device), slm.hidden()[:, -1], hidden)
    return rows, totals(rows, t0, **roles)
