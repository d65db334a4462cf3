"""A backend whose rows lag behind the decode: tokens wait in `pending` and go through the model in one
right-padded forward when someone needs its predictions. The lazy LLM (SLM-only triggers, draft and
verify) and decoupled S2T-Local's scorer are both this."""

from __future__ import annotations

import torch

from ..backends.base import Backend


class LaggingCache:
    def __init__(self, backend: Backend, prompts: list[list[int]], pad_id: int):
        self.backend = backend
        backend.reset(len(prompts))
        self.pending = [list(p) for p in prompts]  # per row: tokens not yet in the cache
        self.next_raw: list[torch.Tensor | None] = [None] * len(prompts)  # raw logits after the cache's last token
        self.pad_id = pad_id
        self.retired: set[int] = set()
        self.retire([r for r, p in enumerate(prompts) if not p])  # free rows of a continuous batch

    def admit(self, row: int, prompt: list[int]) -> None:
        """A newcomer takes the row: its cache starts over, its prompt goes through with the next forward."""
        self.backend.admit(row)
        self.retired.discard(row)
        self.pending[row] = list(prompt)
        self.next_raw[row] = None

    def retire(self, rows: list[int]) -> None:
        """Finished rows leave the model's batch."""
        if not rows:
            return
        self.backend.retire(rows)
        self.retired |= set(rows)
        for r in rows:
            self.pending[r] = []

    def follow(self, row: int, token: int) -> None:
        """The decode emitted `token`; the model sees it at its next forward."""
        self.pending[row].append(token)

    def forget(self, row: int) -> None:
        """A finished row: nothing more goes through the model for it."""
        self.pending[row] = []

    def forward(self, extra: list[list[int]], rows: list[int] | None = None):
        """Feed pending + extra tokens of `rows` (default every row) in one forward.

        Returns per row (None where a row has nothing) the raw logits [len(extra[r]) + 1, V] predicting the
        token after the pending ones and after each extra token, and each row's length before its extras
        (where a rollback to the first extra token truncates to)."""
        B = len(self.pending)
        rows = [r for r in range(B) if r not in self.retired] if rows is None else rows
        seqs = {r: self.pending[r] + extra[r] for r in rows}
        first = [self.backend.length(r) + len(self.pending[r]) if r in seqs else 0 for r in range(B)]
        width = max((len(s) for s in seqs.values()), default=0)
        out: list[torch.Tensor | None] = [None] * B
        if width == 0:
            for r in seqs:
                prev = self.next_raw[r]
                out[r] = prev[None] if prev is not None else None
            return out, first
        ids = torch.full((B, width), self.pad_id, dtype=torch.long)
        live = torch.zeros((B, width), dtype=torch.bool)
        for r, s in seqs.items():
            if s:
                ids[r, : len(s)] = torch.tensor(s)
                live[r, : len(s)] = True
        logits = self.backend.extend(ids, live)
        assert logits is not None
        for r in rows:
            n_pend, n_extra = len(self.pending[r]), len(extra[r])
            if n_pend:
                got = logits[r, n_pend - 1 : n_pend + n_extra]
            else:
                prev = self.next_raw[r]
                got = torch.cat([prev[None], logits[r, :n_extra]]) if prev is not None else logits[r, :n_extra]
            self.pending[r] = []
            if got.shape[0]:
                out[r], self.next_raw[r] = got, got[-1]
        return out, first

    def sync(self, rows: list[int]) -> None:
        """Bring the listed rows' caches up to date; nobody reads the predictions."""
        width = max(len(self.pending[r]) for r in rows)
        if not width:
            return
        B = len(self.pending)
        ids = torch.full((B, width), self.pad_id, dtype=torch.long)
        live = torch.zeros((B, width), dtype=torch.bool)
        for r in rows:
            n = len(self.pending[r])
            ids[r, :n], live[r, :n] = torch.tensor(self.pending[r], dtype=torch.long), True
            self.pending[r] = []
            self.next_raw[r] = None
        self.backend.extend(ids, live, logits=False)

    def select(self, rows: list[int], cands: torch.Tensor) -> torch.Tensor:
        """A selection-only model's choice [R] among cands [R, K] after the listed rows' tokens (pending
        ones handed over first: they are committed tokens, so a failed request leaves them right)."""
        self.sync(rows)
        return self.backend.select(rows, cands)

    def rollback(self, row: int, length: int, token: int) -> None:
        """Keep the row's first `length` cached tokens; `token` becomes pending."""
        self.backend.truncate(row, length)
        self.pending[row] = [token]
        self.next_raw[row] = None
