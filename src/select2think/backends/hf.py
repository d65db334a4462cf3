"""A transformers causal LM behind the backend interface (the reference engine; training uses it too).

The cache has one row per batch row and T slots. `slot_mask[j, t]` says whether slot t of cache row j
holds a live token: left padding, rolled-back tokens and dropped siblings are dead slots no query attends
to. Positions count live slots only, so a row's tokens see exactly what they would see alone. Slots that
are dead in every row are cropped. Retired rows leave the cache; callers keep using batch row numbers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import DynamicCache

from .base import Backend, Capabilities
from .tree import additive, sibling_visibility


class AdapterOff:
    """A PEFT model seen with its adapter disabled: a base-model view sharing the adapted model's weights
    (S2T-Local's decoupled mode generates with it while the adapted model scores)."""

    def __init__(self, peft_model: Any):
        self.peft = peft_model
        self.config = peft_model.config

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.peft.parameters()

    def get_output_embeddings(self) -> Any:
        return self.peft.get_output_embeddings()

    def __call__(self, **kwargs: Any) -> Any:
        with self.peft.disable_adapter():
            return self.peft(**kwargs)


class HFBackend(Backend):
    name = "hf"
    repack_slack = 64  # dead slots tolerated beyond twice the longest row before `admit` re-packs
    capabilities = Capabilities(
        full_logits=True, hidden_states=True, sibling_scoring=True, adapters=True, admission=True, output_head=True
    )

    def __init__(self, model: Any):
        head = model.get_output_embeddings()
        super().__init__(vocab_rows=head.weight.shape[0], hidden_size=head.weight.shape[1])
        self.model = model
        self.n_params = sum(p.numel() for p in model.parameters())
        self.context_length = getattr(model.config, "max_position_embeddings", None)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.reset(0)

    def spawn(self) -> HFBackend:
        return HFBackend(self.model)

    def without_adapter(self) -> HFBackend:
        """A second backend (own cache) on the same weights with the LoRA adapter switched off."""
        return HFBackend(AdapterOff(self.model))

    def output_rows(self, ids: Sequence[int]) -> torch.Tensor:
        """The output head's rows [len(ids), H] for `ids` in fp32 (S2T-Local's untrained score head)."""
        return self.model.get_output_embeddings().weight.detach()[list(ids)].float().cpu()

    # -- the batch ---------------------------------------------------------------------------------
    def reset(self, batch_size: int) -> None:
        self.cache = DynamicCache(config=self.model.config)
        self.slot_mask = torch.zeros(batch_size, 0, dtype=torch.bool, device=self.device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.rows = list(range(batch_size))  # the batch rows still in the cache, in cache order
        self.batch_size = batch_size
        self._siblings: tuple[list[int], int] | None = None  # (rows, first sibling slot) of a tree on the cache
        self._peeked: tuple[list[int], torch.Tensor] | None = None  # (rows, cands) scored on a view
        self._parked: set[int] = set()  # retired while no other row was held: still in the cache (`retire`)
        self._reset_counters(batch_size)

    @property
    def num_slots(self) -> int:
        return self.slot_mask.shape[1]

    def length(self, row: int) -> int:
        return int(self.lengths[self._cache_row(row)])

    def _cache_row(self, row: int) -> int:
        try:
            return self.rows.index(row)
        except ValueError:
            raise ValueError(f"row {row} was retired from the cache") from None

    def _held(self) -> torch.Tensor | None:
        """Cache rows' batch indices, or None while cache row j is batch row j for every row."""
        in_order = len(self.rows) == self.batch_size and self.rows == list(range(self.batch_size))
        return None if in_order else torch.tensor(self.rows, device=self.device)

    @torch.no_grad()
    def extend(
        self, tokens: torch.Tensor, live: torch.Tensor, logits: bool = True, last_only: bool = False
    ) -> torch.Tensor | None:
        self._drop_siblings()
        held = self._held()
        counts = live.sum(1)[self.rows].tolist()  # read before the copy to the device: no synchronisation
        tokens, live = tokens.to(self.device), live.to(self.device)
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
        self._keep_hidden(out, held)
        self.slot_mask = attention
        self.lengths = self.lengths + live.long().sum(1)
        self._count(self.rows, counts)
        return self._to_batch(out.logits.float(), held) if logits else None

    def truncate(self, row: int, length: int) -> None:
        self._drop_siblings()
        j = self._cache_row(row)
        live_slots = self.slot_mask[j].nonzero().flatten()
        if length < len(live_slots):
            self.slot_mask[j, int(live_slots[length]) :] = False
            self.lengths[j] = length
        self._compact_tail()

    def retire(self, rows: Sequence[int]) -> None:
        self._drop_siblings()
        finished = set(rows)
        keep = [j for j, r in enumerate(self.rows) if r not in finished]
        if not keep:  # the cache never goes empty; `admit` drops these once a newcomer holds a row
            self._parked |= finished
            return
        if len(keep) == len(self.rows):
            return
        idx = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(idx)
        self.slot_mask, self.lengths = self.slot_mask[idx], self.lengths[idx]
        self.rows = [self.rows[j] for j in keep]
        self._compact_tail()

    def admit(self, row: int) -> None:
        """A held row's slots all turn dead; a retired row gets a new cache row of dead slots (appended: the
        cache order is `self.rows`'). Each newcomer's prefill adds dead slots to every other row, so the slots
        are re-packed once they far outnumber the longest row."""
        self._drop_siblings()
        if not 0 <= row < self.batch_size:
            raise IndexError(f"row {row} is outside the batch of {self.batch_size} rows")
        if row in self.rows:
            j = self.rows.index(row)
            self.slot_mask[j] = False
            self.lengths[j] = 0
        else:
            layers: list[Any] = list(self.cache.layers)  # attention layers: keys/values [B, heads, T, d]
            for layer in layers:
                keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
                if keys is not None and values is not None and keys.dim() == 4:
                    layer.keys = torch.cat([keys, keys.new_zeros(1, *keys.shape[1:])])
                    layer.values = torch.cat([values, values.new_zeros(1, *values.shape[1:])])
            self.slot_mask = torch.cat([self.slot_mask, self.slot_mask.new_zeros(1, self.num_slots)])
            self.lengths = torch.cat([self.lengths, self.lengths.new_zeros(1)])
            self.rows.append(row)
        self.row_forwards[row] = self.row_tokens[row] = 0
        parked, self._parked = self._parked - {row}, set()
        if parked:
            self.retire(sorted(parked))
        self._compact_tail()
        if self.num_slots > 2 * int(self.lengths.max()) + self.repack_slack:
            self._repack()

    def _repack(self) -> None:
        """Move every row's live slots, in order, to the right end of a narrower cache (the layout left padding
        gives). Positions were baked into the keys when they were computed, so only the mask moves with them."""
        width = int(self.slot_mask.sum(1).max())
        src = torch.zeros(len(self.rows), width, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(self.rows), width, dtype=torch.bool, device=self.device)
        for j in range(len(self.rows)):
            live = self.slot_mask[j].nonzero().flatten()
            src[j, width - len(live) :] = live
            mask[j, width - len(live) :] = True
        layers: list[Any] = list(self.cache.layers)
        for layer in layers:
            for name in ("keys", "values"):
                x = getattr(layer, name, None)
                if x is not None and x.dim() == 4:
                    setattr(layer, name, x.gather(2, src[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3])))
        self.slot_mask = mask

    # -- siblings ----------------------------------------------------------------------------------
    @torch.no_grad()
    def score_siblings(self, rows: Sequence[int], cands: torch.Tensor, logits: bool = True) -> torch.Tensor | None:
        """Every held row listed: one tree forward on the cache (K slots per row, dead until kept), so the
        winner needs no further forward. A subset: the listed rows alone score on a view of their cache
        rows (the others would pay K positions each), and `keep_siblings` then feeds the winners."""
        self._drop_siblings()
        rows = list(rows)
        K = cands.shape[1]
        if sorted(rows) == sorted(self.rows):
            order = [rows.index(r) for r in self.rows]
            feed = cands[order].to(self.device)
            sub_mask, lengths = self.slot_mask, self.lengths
            self._siblings = (list(self.rows), self.num_slots)
            out = self.model(
                input_ids=feed,
                attention_mask=self._tree_mask(sub_mask, K),
                position_ids=lengths[:, None].expand(-1, K),
                cache=self.cache,
                use_cache=True,
                output_hidden_states=self.want_hidden,
                **({} if logits else {"logits_to_keep": 1}),
            )
            self.slot_mask = torch.cat([self.slot_mask, torch.zeros_like(feed, dtype=torch.bool)], dim=1)
            back = [self.rows.index(r) for r in rows]
            self._count(self.rows, [K] * len(self.rows))
            self._keep_hidden(out, None, back)
            return out.logits.float()[back] if logits else None
        out = self._peek(rows, cands, logits)
        self._peeked = (rows, cands)
        return out if logits else None

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.model.get_output_embeddings()
        return head(hidden.to(self.device, self.dtype)).float()

    def _peek(self, rows: list[int], cands: torch.Tensor, logits: bool = True) -> torch.Tensor:
        sub = torch.tensor([self._cache_row(r) for r in rows], device=self.device)
        layers: list[Any] = list(self.cache.layers)
        saved = [(layer.keys, layer.values) for layer in layers]
        K = cands.shape[1]
        try:
            for layer, (k, v) in zip(layers, saved, strict=True):
                layer.keys, layer.values = k[sub], v[sub]  # updates concatenate: the originals stay intact
            out = self.model(
                input_ids=cands.to(self.device),
                attention_mask=self._tree_mask(self.slot_mask[sub], K),
                position_ids=self.lengths[sub][:, None].expand(len(rows), K),
                cache=self.cache,
                use_cache=True,
                output_hidden_states=self.want_hidden,
                **({} if logits else {"logits_to_keep": 1}),
            )
        finally:
            for layer, (k, v) in zip(layers, saved, strict=True):
                layer.keys, layer.values = k, v
        self._count(rows, [K] * len(rows))
        self._keep_hidden(out, None)
        return out.logits.float()

    def keep_siblings(self, picks: dict[int, int]) -> None:
        if self._siblings is not None:
            _, base = self._siblings
            for r, pick in picks.items():
                j = self._cache_row(r)
                self.slot_mask[j, base + pick] = True
                self.lengths[j] += 1
            self._siblings = None
            self._compact_tail()
        elif self._peeked is not None:
            rows, cands = self._peeked
            self._peeked = None
            feed = torch.zeros(self.batch_size, 1, dtype=torch.long)
            live = torch.zeros(self.batch_size, 1, dtype=torch.bool)
            for r, pick in picks.items():
                feed[r, 0], live[r, 0] = int(cands[rows.index(r), pick]), True
            hidden = self.want_hidden
            self.want_hidden = False
            self.extend(feed, live, logits=False)
            self.want_hidden = hidden
        else:
            raise ValueError("keep_siblings without a score_siblings before it")

    def _drop_siblings(self) -> None:
        if self._siblings is not None:
            self._siblings = None
            self._compact_tail()
        self._peeked = None

    # -- helpers -----------------------------------------------------------------------------------
    def _tree_mask(self, slot_mask: torch.Tensor, K: int) -> torch.Tensor:
        """Additive mask [B, 1, K, T + K]: K siblings each see the row's live slots and themselves."""
        return additive(sibling_visibility(slot_mask, K), self.dtype)

    def _keep_hidden(self, out: Any, held: torch.Tensor | None, order: list[int] | None = None) -> None:
        if not self.want_hidden:
            self.last_hidden = None
            return
        hidden = out.hidden_states[-1].float()
        self.last_hidden = hidden[order] if order is not None else self._to_batch(hidden, held)

    def _to_batch(self, x: torch.Tensor, held: torch.Tensor | None) -> torch.Tensor:
        """Outputs of the held rows placed at their batch rows; retired rows get zeros nobody reads."""
        if held is None:
            return x
        full = x.new_zeros((self.batch_size, *x.shape[1:]))
        full[held] = x
        return full

    def _compact_tail(self) -> None:
        """Physically drop trailing slots that are dead in every row."""
        alive = self.slot_mask.any(0).nonzero()
        keep = int(alive.max()) + 1 if alive.numel() else 0
        if keep < self.num_slots:
            self.cache.crop(keep - self.num_slots)  # negative: number of slots to drop
            self.slot_mask = self.slot_mask[:, :keep]
