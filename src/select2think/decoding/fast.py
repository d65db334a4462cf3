"""Fast paths that emit exactly the reference loop's tokens while running the LLM far less.

- `decode_draft_verify` (triggers that need the LLM, e.g. kl): the SLM drafts a block with its base
  chooser, the LLM scores the whole block in one forward, the first position where the policy's
  choice differs from the draft is resolved and both caches roll back past it.
- `decode_lazy` (SLM-only triggers): the LLM's cache lags behind and catches up in one multi-token
  forward only when a trigger fires.
Both start the LLM lazily: its prompt prefill rides along with its first forward.
"""

from __future__ import annotations

import time

import torch

from ..backends import HFBackend
from .policy import Policy
from .state import DecodeStats, RowState, active_view, commit_step, left_pad, totals


class _LazyLLM:
    """The LLM's side: per-row pending tokens, caught up in one right-padded forward when needed."""

    def __init__(self, model, vocab_size, banned, prompts, pad_id):
        self.backend = HFBackend(model, vocab_size, banned)
        self.backend.reset(len(prompts))
        self.pending = [list(p) for p in prompts]
        self.next_logits: list[torch.Tensor | None] = [None] * len(prompts)
        self.pad_id = pad_id

    def forward(self, extra: list[list[int]]) -> tuple[list[torch.Tensor], list[int]]:
        """Feed pending + extra per row. Returns per-row logits [len(extra_r) + 1, V] predicting the
        position after the pending tokens and after each extra token, and each row's first extra slot."""
        B = len(self.pending)
        seqs = [self.pending[r] + extra[r] for r in range(B)]
        width = max(len(s) for s in seqs)
        base = self.backend.num_slots
        first_extra = [base + len(self.pending[r]) for r in range(B)]
        if width == 0:
            return [n[None] if n is not None else None for n in self.next_logits], first_extra
        ids = torch.full((B, width), self.pad_id, dtype=torch.long)
        live = torch.zeros((B, width), dtype=torch.bool)
        for r, s in enumerate(seqs):
            if s:
                ids[r, : len(s)] = torch.tensor(s)
                live[r, : len(s)] = True
        logits = self.backend.extend(ids, live)
        out = []
        for r in range(B):
            n_pend, n_extra = len(self.pending[r]), len(extra[r])
            if n_pend:
                rows = logits[r, n_pend - 1 : n_pend + n_extra]
            else:
                prev = self.next_logits[r]
                rows = torch.cat([prev[None], logits[r, :n_extra]]) if prev is not None else logits[r, :n_extra]
            self.pending[r] = []
            if rows.shape[0] == 0:  # a finished row with nothing to feed
                out.append(None)
                continue
            out.append(rows)
            self.next_logits[r] = rows[-1]
        return out, first_extra

    def rollback(self, row: int, slot: int, token: int) -> None:
        """Drop the row's slots from `slot` on; `token` becomes pending."""
        self.backend.kill_slots(row, slot)
        self.pending[row] = [token]
        self.next_logits[row] = None


def _retire(finished: list[int], slm: HFBackend, llm: _LazyLLM) -> None:
    """Finished rows leave both caches: the rest decode as fast as a smaller batch (no-op for rows gone)."""
    if finished:
        slm.retire(finished)
        llm.backend.retire(finished)


def _stats(slm: HFBackend, llm: _LazyLLM, rows, t0) -> DecodeStats:
    stats = DecodeStats(
        slm_forwards=slm.forwards,
        slm_tokens=slm.tokens,
        llm_forwards=llm.backend.forwards,
        llm_tokens=llm.backend.tokens,
    )
    return totals(rows, stats, t0, slm, llm.backend)


def decode_draft_verify(
    slm_model,
    llm_model,
    tokenizer,
    vocab_size,
    banned,
    prompts,
    policy: Policy,
    make_row,
    row_seeds,
    pad_id,
    draft_len: int,
) -> tuple[list[RowState], DecodeStats]:
    t0 = time.perf_counter()
    B = len(prompts)
    slm = HFBackend(slm_model, vocab_size, banned)
    slm.reset(B)
    llm = _LazyLLM(llm_model, vocab_size, banned, prompts, pad_id)
    rows = [make_row() for _ in range(B)]
    ids, live = left_pad(prompts, pad_id)
    s_logits = slm.extend(ids, live, last_only=True)[:, -1]
    slm_pending: list[int | None] = [None] * B
    while any(not r.done for r in rows):
        # 1. rows cut in the last block feed their corrected token to the SLM
        if any(p is not None for p in slm_pending):
            feed = torch.tensor([[p if p is not None else pad_id] for p in slm_pending])
            mask = torch.tensor([[p is not None] for p in slm_pending])
            new = slm.extend(feed, mask)[:, -1]
            s_logits = torch.where(mask.to(new.device), new, s_logits)
            slm_pending = [None] * B
        # 2. draft
        active = [r for r in range(B) if not rows[r].done]
        n = min(draft_len, max(rows[r].remaining for r in active))
        drafting = [r for r in active]
        drafts: list[list[int]] = [[] for _ in range(B)]
        s_lps: list[list[torch.Tensor]] = [[] for _ in range(B)]
        base_slot = slm.num_slots
        for i in range(n):
            drafting = [
                r for r in drafting if i < rows[r].remaining and (not drafts[r] or drafts[r][-1] not in rows[r].eos_ids)
            ]
            if not drafting:
                break
            idx = torch.tensor(drafting, device=s_logits.device)
            s_lp = s_logits[idx].log_softmax(-1)
            keys = [(row_seeds[r], rows[r].step + i) for r in drafting]
            tok = policy.base.select(s_lp, None, keys)
            feed = torch.full((B, 1), pad_id, dtype=torch.long)
            mask = torch.zeros((B, 1), dtype=torch.bool)
            for j, r in enumerate(drafting):
                drafts[r].append(int(tok[j]))
                s_lps[r].append(s_lp[j])
                feed[r, 0], mask[r, 0] = int(tok[j]), True
            new = slm.extend(feed, mask)[:, -1]
            s_logits = torch.where(mask.to(new.device), new, s_logits)
        # 3. verify: one LLM forward over every row's pending tokens and drafts
        l_rows, first_slot = llm.forward(drafts)
        flat_rows = [r for r in range(B) for _ in drafts[r]]
        if not flat_rows:
            break
        s_lp = torch.stack([x for r in range(B) for x in s_lps[r]])
        l_lp = torch.cat([l_rows[r][: len(drafts[r])] for r in range(B) if drafts[r]]).log_softmax(-1)
        steps = torch.tensor([rows[r].step + i for r in range(B) for i in range(len(drafts[r]))], device=s_lp.device)
        keys = [(row_seeds[r], int(s)) for r, s in zip(flat_rows, steps.tolist())]
        fired, _ = policy.fire(s_lp, l_lp, steps, keys)
        tokens = policy.choose(s_lp, l_lp, fired, keys).tolist()
        flips = (torch.tensor(tokens, device=s_lp.device) != s_lp.argmax(-1)).tolist()
        hits = policy.hits(s_lp, l_lp).tolist()
        fired = fired.tolist()
        # 4. commit per row up to the first position where the choice differs from the draft
        pos = 0
        for r in range(B):
            for i, d in enumerate(drafts[r]):
                j = pos + i
                if rows[r].commit(tokens[j], fired[j], flips[j], hits[j] if fired[j] else None):
                    llm.pending[r] = []
                    break
                if tokens[j] != d:
                    slm.kill_slots(r, base_slot + i)
                    slm_pending[r] = tokens[j]
                    llm.rollback(r, first_slot[r] + i, tokens[j])
                    break
            pos += len(drafts[r])
        _retire([r for r in range(B) if rows[r].done], slm, llm)
        slm.compact_tail()
        llm.backend.compact_tail()
    return rows, _stats(slm, llm, rows, t0)


def decode_lazy(
    slm_model, llm_model, tokenizer, vocab_size, banned, prompts, policy: Policy, make_row, row_seeds, pad_id
) -> tuple[list[RowState], DecodeStats]:
    t0 = time.perf_counter()
    B = len(prompts)
    slm = HFBackend(slm_model, vocab_size, banned)
    slm.reset(B)
    llm = _LazyLLM(llm_model, vocab_size, banned, prompts, pad_id)
    rows = [make_row() for _ in range(B)]
    ids, live = left_pad(prompts, pad_id)
    s_logits = slm.extend(ids, live, last_only=True)[:, -1]
    while (view := active_view(rows, s_logits, row_seeds)) is not None:
        s_lp = view.slm_logp
        fired, _ = policy.fire(s_lp, None, view.steps, view.keys)
        l_lp = None
        if fired.any():
            l_rows, _ = llm.forward([[] for _ in range(B)])
            l_lp = torch.stack([l_rows[r][-1] for r in view.active]).log_softmax(-1)
        tokens = policy.choose(s_lp, l_lp, fired, view.keys)
        hits = policy.hits(s_lp, l_lp) if l_lp is not None else None
        feed, mask = commit_step(rows, view, tokens, fired, tokens != s_lp.argmax(-1), hits, pad_id)
        for j, r in enumerate(view.active):  # the LLM catches up on these tokens at its next trigger
            llm.pending[r] = llm.pending[r] + [int(tokens[j])] if mask[r, 0] else []
        _retire([r for r in view.active if rows[r].done], slm, llm)
        if not mask.any():
            break
        new = slm.extend(feed, mask)[:, -1]
        s_logits = torch.where(mask.to(new.device), new, s_logits)
    return rows, _stats(slm, llm, rows, t0)
