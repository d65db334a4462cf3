"""A transformers causal LM behind a batched, rollback-able KV cache.

The cache has B rows of T slots. `slot_mask[b, t]` says whether slot t of row b holds a live token:
left padding, finished rows and rolled-back draft tokens are dead slots that no query attends to.
Positions are counted over live slots only, so a row's tokens see exactly what they would see alone.
Rolling back marks slots dead (and physically crops slots that are dead in every row).
Finished rows can be retired: they leave the cache, and later forwards run on the remaining rows only.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class HFBackend:
    def __init__(self, model, vocab_size: int, banned_ids: tuple[int, ...] = ()):
        self.model = model
        self.vocab_size = vocab_size
        self.banned = torch.tensor(banned_ids, dtype=torch.long) if banned_ids else None
        self.device = next(model.parameters()).device
        self.want_hidden = False  # keep the final hidden states of the last forward (learned trigger)
        self.last_hidden: torch.Tensor | None = None
        self.forwards = 0  # model calls
        self.tokens = 0  # live tokens processed
        self.reset(0)

    def reset(self, batch_size: int) -> None:
        self.cache = DynamicCache(config=self.model.config)
        self.slot_mask = torch.zeros(batch_size, 0, dtype=torch.bool, device=self.device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.row_forwards = [0] * batch_size  # forwards in which the row had a live token
        self.row_tokens = [0] * batch_size  # live tokens the row put through the model
        self.rows = list(range(batch_size))  # the rows still in the cache, in cache order

    @property
    def num_slots(self) -> int:
        return self.slot_mask.shape[1]

    @torch.no_grad()
    def extend(
        self, tokens: torch.Tensor, live: torch.Tensor, logits: bool = True, last_only: bool = False
    ) -> torch.Tensor | None:
        """Append tokens [B, k] (dead where `live` is False); return float32 logits [B, k, vocab].

        Logits are cut to the tokenizer's vocabulary and banned ids set to -inf. `logits=False` only
        fills the cache (a catch-up whose predictions nobody reads) and skips the vocabulary projection;
        `last_only` returns the last position's logits only [B, 1, vocab] (a prompt prefill: projecting
        every position of 128 prompts onto a 152k vocabulary costs ~12 GB and minutes on a CPU).
        """
        full_batch = tokens.shape[0]
        held = self._held()
        tokens = tokens.to(self.device)
        live = live.to(self.device)
        if held is not None:
            tokens, live = tokens[held], live[held]
        positions = (self.lengths[:, None] + live.long().cumsum(1) - 1).clamp(min=0)
        attention = torch.cat([self.slot_mask, live], dim=1)
        out = self.model(
            input_ids=tokens,
            attention_mask=attention.long(),
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            output_hidden_states=self.want_hidden,
            **({"logits_to_keep": 1} if (last_only or not logits) else {}),
        )
        self.last_hidden = _to_batch(out.hidden_states[-1].float(), held, full_batch) if self.want_hidden else None
        self.slot_mask = attention
        self.lengths = self.lengths + live.long().sum(1)
        self._count(live)
        if not logits:
            return None
        return _to_batch(self.text_logits(out.logits.float()), held, full_batch)

    def _held(self) -> torch.Tensor | None:
        """Indices of the rows still in the cache, or None while no row has been retired."""
        n = len(self.row_tokens)
        return None if len(self.rows) == n else torch.tensor(self.rows, device=self.device)

    def _slot_row(self, row: int) -> int:
        """The cache row holding batch row `row`."""
        try:
            return self.rows.index(row)
        except ValueError:
            raise ValueError(f"row {row} was retired from the cache") from None

    def retire(self, finished) -> None:
        """Drop finished rows from the cache so that later forwards skip them. Callers keep using batch
        row numbers: inputs for retired rows are ignored and their outputs are zeros nobody reads."""
        finished = set(finished)
        keep = [i for i, r in enumerate(self.rows) if r not in finished]
        if len(keep) == len(self.rows) or not keep:
            return
        idx = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(idx)
        self.slot_mask, self.lengths = self.slot_mask[idx], self.lengths[idx]
        self.rows = [self.rows[i] for i in keep]
        self.compact_tail()

    def _count(self, live: torch.Tensor) -> None:
        self.forwards += 1
        self.tokens += int(live.sum())
        for j, n in enumerate(live.sum(1).tolist()):
            r = self.rows[j]  # the cache's j-th row
            self.row_tokens[r] += n
            self.row_forwards[r] += n > 0

    @torch.no_grad()
    def extend_tree(self, tokens: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """Score K sibling tokens per row against the cache in one forward; return raw logits [B, K, V_all].

        Every live candidate sits at the row's next position and sees the prefix and itself only (a
        tree attention mask), so one forward replaces K forwards of K prefix copies. The slots are
        added dead-until-accepted: call `accept_tree` to keep one candidate per row.
        """
        full_batch = tokens.shape[0]
        held = self._held()
        tokens, live = tokens.to(self.device), live.to(self.device)
        if held is not None:
            tokens, live = tokens[held], live[held]
        B, K = tokens.shape
        positions = self.lengths[:, None].expand(B, K)
        out = self.model(
            input_ids=tokens,
            attention_mask=self._tree_mask(self.slot_mask, K),
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            output_hidden_states=self.want_hidden,
        )
        self.last_hidden = _to_batch(out.hidden_states[-1].float(), held, full_batch) if self.want_hidden else None
        self.slot_mask = torch.cat([self.slot_mask, torch.zeros_like(live)], dim=1)
        self._count(live)
        return _to_batch(out.logits.float(), held, full_batch)

    def _tree_mask(self, slot_mask: torch.Tensor, K: int) -> torch.Tensor:
        """Additive mask [B, 1, K, T + K]: K siblings each see the row's live slots and themselves."""
        B, T = slot_mask.shape
        visible = torch.zeros(B, 1, K, T + K, dtype=torch.bool, device=self.device)
        visible[:, 0, :, :T] = slot_mask[:, None, :]
        visible[:, 0, :, T:] = torch.eye(K, dtype=torch.bool, device=self.device)
        dtype = next(self.model.parameters()).dtype
        return torch.zeros(visible.shape, dtype=dtype, device=self.device).masked_fill(~visible, torch.finfo(dtype).min)

    @torch.no_grad()
    def peek_tree(self, rows: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """Raw logits [len(rows), K, V_all] of K sibling candidates per listed row, cache left unchanged.

        For a batch in which only some rows need candidates scored: those rows alone pay for K tokens
        (on a view of their cache rows) and the whole batch then extends by one token as usual, instead
        of K tokens and K slots for every row (`extend_tree`).
        """
        sub = torch.tensor([self._slot_row(r) for r in rows], device=self.device)
        layers = self.cache.layers
        saved = [(layer.keys, layer.values) for layer in layers]
        K = tokens.shape[1]
        try:
            for layer, (k, v) in zip(layers, saved):
                layer.keys, layer.values = k[sub], v[sub]  # updates concatenate: the originals stay intact
            out = self.model(
                input_ids=tokens.to(self.device),
                attention_mask=self._tree_mask(self.slot_mask[sub], K),
                position_ids=self.lengths[sub][:, None].expand(len(rows), K),
                cache=self.cache,
                use_cache=True,
            )
        finally:
            for layer, (k, v) in zip(layers, saved):
                layer.keys, layer.values = k, v
        self.forwards += 1
        self.tokens += len(rows) * K
        for r in rows:
            self.row_tokens[r] += K
            self.row_forwards[r] += 1
        return out.logits.float()

    def accept_tree(self, row: int, slot: int) -> None:
        """Keep the candidate at `slot` (from the last `extend_tree`) as the row's next token."""
        j = self._slot_row(row)
        self.slot_mask[j, slot] = True
        self.lengths[j] += 1

    def text_logits(self, raw: torch.Tensor) -> torch.Tensor:
        """Cut raw logits to the tokenizer's vocabulary and mask banned ids."""
        logits = raw[..., : self.vocab_size].clone()
        if self.banned is not None:
            logits[..., self.banned.to(logits.device)] = float("-inf")
        return logits

    def kill_slots(self, row: int, start_slot: int) -> None:
        """Roll row back: every slot from `start_slot` on becomes dead."""
        j = self._slot_row(row)
        killed = int(self.slot_mask[j, start_slot:].sum())
        self.slot_mask[j, start_slot:] = False
        self.lengths[j] -= killed

    def compact_tail(self) -> None:
        """Physically drop trailing slots that are dead in every row."""
        alive = self.slot_mask.any(0).nonzero()
        keep = int(alive.max()) + 1 if alive.numel() else 0
        if keep < self.num_slots:
            self.cache.crop(keep - self.num_slots)  # negative: number of slots to drop
            self.slot_mask = self.slot_mask[:, :keep]


def _to_batch(x: torch.Tensor, held: torch.Tensor | None, full_batch: int) -> torch.Tensor:
    """Outputs of the held rows placed at their batch rows; retired rows get zeros nobody reads."""
    if held is None:
        return x
    full = x.new_zeros((full_batch, *x.shape[1:]))
    full[held] = x
    return full
