"""Fast paths that emit exactly the reference loop's tokens while running the LLM far less.

- `decode_draft_verify` (triggers that need the LLM, e.g. kl): the SLM drafts a block with its base
  chooser, the LLM scores the whole block in one forward, the first position where the policy's
  choice differs from the draft is resolved and both caches roll back past it.
- `decode_lazy` (SLM-only triggers): the LLM's cache lags behind and catches up in one multi-token
  forward only when a trigger fires; a selection-only LLM (a remote server) is instead asked for its
  choice among the fired rows' candidates.
Both start the LLM lazily: its prompt prefill rides along with its first forward.
Both hand each committed step to the batch's recorder if it has one (decoding.record).
"""

from __future__ import annotations

import time

import torch

from ..backends.base import Backend
from .lagging import LaggingCache
from .record import Steps
from .state import Batch, DecodeStats, RowState, StepView, active_view, commit_step, shaped, to_host, totals


def _retire(finished: list[int], slm: Backend, llm: LaggingCache) -> None:
    """Finished rows leave both caches: the rest decode as fast as a smaller batch (no-op for rows gone)."""
    if finished:
        slm.retire(finished)
        llm.retire(finished)


def _draft(slm: Backend, batch: Batch, rows: list[RowState], s_logits: torch.Tensor, n: int, hidden=None):
    """Each active row drafts up to `n` tokens with the base chooser. Returns (drafts per row, the SLM's
    log-probs [V] at each drafted position, text logits [B, V] after the last drafted token, and with
    `hidden` [B, H] (the recorder wants it) the final hidden state [H] at each drafted position's prefix
    and the hidden states [B, H] after the last drafted token)."""
    B = len(rows)
    drafts: list[list[int]] = [[] for _ in range(B)]
    s_lps: list[list[torch.Tensor]] = [[] for _ in range(B)]
    hids: list[list[torch.Tensor]] = [[] for _ in range(B)]
    drafting = [r for r in range(B) if not rows[r].done]
    for i in range(n):
        drafting = [
            r for r in drafting if i < rows[r].remaining and (not drafts[r] or drafts[r][-1] not in rows[r].eos_ids)
        ]
        if not drafting:
            break
        s_lp = shaped(rows, drafting, s_logits[drafting]).log_softmax(-1)
        keys = [(batch.row_seeds[r], rows[r].step + i) for r in drafting]
        tok = batch.policy.base.select(s_lp, None, keys).tolist()  # one read-back per drafted position
        feed = torch.full((B, 1), batch.pad_id, dtype=torch.long)
        live = torch.zeros((B, 1), dtype=torch.bool)
        for j, r in enumerate(drafting):
            drafts[r].append(tok[j])
            s_lps[r].append(s_lp[j])
            if hidden is not None:
                hids[r].append(hidden[r])
            feed[r, 0], live[r, 0] = tok[j], True
        new = batch.next_logits(slm, feed, live)
        s_logits = torch.where(live.to(new.device), new, s_logits)
        hidden = batch.next_hidden(slm, live, hidden)
    return drafts, s_lps, s_logits, hids, hidden


def _verify(batch: Batch, rows: list[RowState], drafts, s_lps, l_raw):
    """The policy at every drafted position at once: (tokens, fired, flips, hits), flat in row order, and
    what it saw there (SLM log-probs [N, V], LLM log-probs [N, V], trigger statistic [N], fired [N])."""
    policy = batch.policy
    flat_rows = [r for r in range(len(rows)) for _ in drafts[r]]
    s_lp = torch.stack([x for r in range(len(rows)) for x in s_lps[r]])
    l_lp = batch.vocab.logprobs(torch.cat([l_raw[r][: len(drafts[r])] for r in range(len(rows)) if drafts[r]]))
    steps = torch.tensor([rows[r].step + i for r in range(len(rows)) for i in range(len(drafts[r]))])
    keys = [(batch.row_seeds[r], int(s)) for r, s in zip(flat_rows, steps.tolist(), strict=True)]
    fired, stat = policy.fire(s_lp, l_lp, steps.to(s_lp.device), keys)
    tokens = policy.choose(s_lp, l_lp, fired, keys)
    seen = (s_lp, l_lp, stat, fired)
    host = to_host(tokens, fired, tokens != s_lp.argmax(-1), policy.hits(s_lp, l_lp))  # the block's one read-back
    return (*host, seen)


def _record(batch: Batch, committed: list[tuple[int, int, int, int, int]], seen, hids) -> None:
    """Hand one verified block's committed (flat index, row, draft position, step, token) entries to the recorder."""
    assert batch.recorder is not None
    if not committed:
        return
    s_lp, l_lp, stat, fired = seen
    idx = torch.tensor([c[0] for c in committed], device=s_lp.device)
    hidden = torch.stack([hids[r][i] for _, r, i, _, _ in committed]) if batch.wants_hidden else None
    rows, steps, tokens = ([c[k] for c in committed] for k in (1, 3, 4))
    batch.recorder.record(Steps(rows, steps, tokens, s_lp[idx], l_lp[idx], stat[idx], fired[idx], hidden))


def decode_draft_verify(
    slm: Backend, llm_backend: Backend, batch: Batch, draft_len: int
) -> tuple[list[RowState], DecodeStats]:
    t0 = time.perf_counter()
    B = len(batch.prompts)
    rows, s_logits = batch.start(slm)
    hidden = batch.start_hidden(slm)
    llm = LaggingCache(llm_backend, batch.prompts, batch.pad_id)
    roles = {"slm": [slm], "llm": [llm_backend]}
    slm_pending: list[int | None] = [None] * B
    while True:
        if new := batch.admit(roles):  # continuous batching: newcomers join between blocks
            s_logits, hidden = batch.join(slm, new, s_logits, hidden)
            for r in new:
                llm.admit(r, batch.prompts[r])
        if all(r.done for r in rows):
            break
        # 1. rows cut in the last block feed their corrected token to the SLM
        if any(p is not None for p in slm_pending):
            feed = torch.tensor([[p if p is not None else batch.pad_id] for p in slm_pending])
            live = torch.tensor([[p is not None] for p in slm_pending])
            got = batch.next_logits(slm, feed, live)
            s_logits = torch.where(live.to(got.device), got, s_logits)
            hidden = batch.next_hidden(slm, live, hidden)
            slm_pending = [None] * B
        # 2. draft
        n = min(draft_len, max(r.remaining for r in rows if not r.done))
        base_len = [slm.length(r) if not rows[r].done else 0 for r in range(B)]
        drafts, s_lps, s_logits, hids, hidden = _draft(slm, batch, rows, s_logits, n, hidden)
        if not any(drafts):
            break
        # 3. verify: one LLM forward over every row's pending tokens and drafts
        l_raw, first_len = llm.forward(drafts)
        tokens, fired, flips, hits, seen = _verify(batch, rows, drafts, s_lps, l_raw)
        # 4. commit per row up to the first position where the choice differs from the draft
        pos = 0
        committed: list[tuple[int, int, int, int, int]] = []  # for the recorder (`_record`)
        for r in range(B):
            for i, d in enumerate(drafts[r]):
                j = pos + i
                if batch.recorder is not None:
                    committed.append((j, r, i, rows[r].step, tokens[j]))
                if rows[r].commit(tokens[j], fired[j], flips[j], hits[j] if fired[j] else None):
                    llm.forget(r)
                    break
                if tokens[j] != d:
                    slm.truncate(r, base_len[r] + i)
                    slm_pending[r] = tokens[j]
                    llm.rollback(r, first_len[r] + i, tokens[j])
                    break
            pos += len(drafts[r])
        if batch.recorder is not None:
            _record(batch, committed, seen, hids)
        _retire([r for r in range(B) if rows[r].done and not rows[r].vacant], slm, llm)
    return rows, totals(rows, t0, **roles)


def _ask_llm(llm: LaggingCache, batch: Batch, view: StepView, fired: torch.Tensor):
    """At a trigger: the LLM's log-probs [N, V], or from a selection-only LLM just its choices [F] among the
    fired rows' candidates (one request per fired row). Only the fired rows catch up (one forward), so a
    row's tokens after its last trigger are never read; a recorder gets every active row's log-probs. The
    rows that did not fire carry their SLM log-probs, which nothing reads (the selector and Hit@K only
    look at fired rows)."""
    idx = fired.nonzero().squeeze(-1)
    if llm.backend.capabilities.selection_only:
        cands = batch.policy.selector.llm_candidates(view.slm_logp[idx])
        return None, llm.select([view.active[j] for j in idx.tolist()], cands)
    ask = list(range(len(view.active))) if batch.recorder is not None else idx.tolist()
    l_raw, _ = llm.forward([[] for _ in range(len(batch.prompts))], rows=[view.active[j] for j in ask])
    l_lp = view.slm_logp.clone()
    got = batch.vocab.logprobs(torch.stack([l_raw[view.active[j]][-1] for j in ask]))
    l_lp[ask] = got.to(l_lp.device, l_lp.dtype)
    return l_lp, None


def decode_lazy(slm: Backend, llm_backend: Backend, batch: Batch) -> tuple[list[RowState], DecodeStats]:
    t0 = time.perf_counter()
    policy = batch.policy
    rows, s_logits = batch.start(slm)
    hidden = batch.start_hidden(slm)
    llm = LaggingCache(llm_backend, batch.prompts, batch.pad_id)
    roles = {"slm": [slm], "llm": [llm_backend]}
    while True:
        if new := batch.admit(roles):  # continuous batching: newcomers join between steps
            s_logits, hidden = batch.join(slm, new, s_logits, hidden)
            for r in new:
                llm.admit(r, batch.prompts[r])
        if (view := active_view(rows, s_logits, batch.row_seeds)) is None:
            break
        s_lp = view.slm_logp
        h = hidden[view.idx] if hidden is not None else None
        fired, stat = policy.fire(s_lp, None, view.steps, view.keys, h)
        l_lp, picks = _ask_llm(llm, batch, view, fired) if fired.any() else (None, None)
        tokens = policy.choose(s_lp, l_lp, fired, view.keys, picks)
        hits = policy.hits(s_lp, l_lp) if l_lp is not None else None
        if batch.recorder is not None:
            batch.recorder.record(Steps(view.active, view.steps.tolist(), tokens.tolist(), s_lp, l_lp, stat, fired, h))
        feed, live = commit_step(rows, view, tokens, fired, tokens != s_lp.argmax(-1), hits, batch.pad_id)
        for r in view.active:  # the LLM catches up on these tokens at its next trigger
            llm.follow(r, int(feed[r, 0])) if live[r, 0] else llm.forget(r)
        _retire([r for r in view.active if rows[r].done], slm, llm)
        if not live.any():
            continue  # every row finished: the next admit may bring newcomers, else the loop ends
        got = batch.next_logits(slm, feed, live)
        s_logits = torch.where(live.to(got.device), got, s_logits)
        hidden = batch.next_hidden(slm, live, hidden)
    return rows, totals(rows, t0, **roles)
