"""A transformers causal LM on a preallocated cache with fixed-shape steps: the GPU path without per-step
overhead (`--backend hf-static`).

Same cache semantics as `hf.py` (a slot mask per row; positions count live slots only), laid out in fixed
buffers: per layer K/V [B, kv_heads, cap, d], the slot mask [B, cap], and a column counter `T` (columns
< T have been written). Every step writes its n tokens at columns T..T+n and attends over all `cap`
columns through an additive mask, so a step's shapes depend only on (B, n, cap): on CUDA each shape is
captured once as a CUDA graph and replayed (decode n=1, a verify block, K siblings); on the CPU the same
step runs eagerly. Widths are padded up to `GRAPH_WIDTHS` with dead tokens so a handful of graphs cover
every verify and catch-up; longer forwards (prompt prefills) run eagerly on the same buffers.

The host keeps the truth about rows (slot mask, lengths, T) and the device a copy, uploaded before a step
when it changed: lengths, rollbacks and retirements never read the device, so the backend itself never
synchronises. Retired rows stay in the buffers as dead rows (fixed shapes); finished rows cost compute.
Dead columns are reclaimed from the tail after rollbacks, and by compaction (each row's live slots moved
to the front, in order) when the buffer fills; the buffer doubles when compaction is not enough.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .base import Capabilities
from .hf import HFBackend

GRAPH_WIDTHS = (1, 2, 4, 8, 16, 17, 32, 64)  # 17: the default draft block of 16 plus a pending correction
MIN_CAPACITY = 256


class SlotCache:
    """K/V buffers per layer [B, kv_heads, cap, d], allocated at the first write; `update` (transformers'
    cache seam) writes the step's tokens at columns `cols` [n] and hands attention the whole buffer."""

    def __init__(self, batch: int, capacity: int):
        self.batch, self.capacity = batch, capacity
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.cols: torch.Tensor | None = None

    def update(
        self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx not in self.keys:
            shape = (self.batch, k.shape[1], self.capacity)
            self.keys[layer_idx] = k.new_zeros((*shape, k.shape[-1]))
            self.values[layer_idx] = v.new_zeros((*shape, v.shape[-1]))
        assert self.cols is not None
        self.keys[layer_idx].index_copy_(2, self.cols, k)
        self.values[layer_idx].index_copy_(2, self.cols, v)
        return self.keys[layer_idx], self.values[layer_idx]

    def buffers(self) -> list[torch.Tensor]:
        return [*self.keys.values(), *self.values.values()]

    def regroup(self, order: torch.Tensor) -> None:
        """Reorder every row's columns in place (addresses kept, so captured graphs stay valid): column c of
        row b becomes the old column order[b, c]."""
        for buf in self.buffers():
            idx = order[:, None, :, None].expand(-1, buf.shape[1], -1, buf.shape[3])
            buf.copy_(buf.gather(2, idx))

    def grown(self, capacity: int) -> SlotCache:
        new = SlotCache(self.batch, capacity)
        for src, dst in ((self.keys, new.keys), (self.values, new.values)):
            for i, buf in src.items():
                dst[i] = buf.new_zeros((*buf.shape[:2], capacity, buf.shape[3]))
                dst[i][:, :, : buf.shape[2]] = buf
        return new


@dataclass
class _Step:
    """Static inputs and outputs of one step shape (a CUDA graph replays into `out`)."""

    ids: torch.Tensor  # [B, n]
    live: torch.Tensor  # [B, n]
    graph: Any = None
    out: tuple[torch.Tensor, torch.Tensor | None] | None = None  # logits [B, n or 1, V], hidden [B, n, H]


class StaticHFBackend(HFBackend):
    name = "hf-static"
    capabilities = Capabilities(full_logits=True, hidden_states=True, sibling_scoring=True, output_head=True)

    def __init__(self, model: Any, graphs: bool | None = None, capacity: int = MIN_CAPACITY):
        self.min_capacity = capacity
        self.graphs_wanted = graphs
        self.graph_error: str | None = None  # why capture failed (the backend then runs eagerly)
        super().__init__(model)
        self.use_graphs = (self.device.type == "cuda") if graphs is None else graphs

    def spawn(self) -> StaticHFBackend:
        return StaticHFBackend(self.model, self.graphs_wanted, self.min_capacity)

    # -- the batch ---------------------------------------------------------------------------------
    def reset(self, batch_size: int) -> None:
        """A batch of the last batch's size reuses its buffers and captured graphs (stale entries are dead)."""
        if getattr(self, "batch_size", None) != batch_size:
            self.batch_size = batch_size
            self._alloc(SlotCache(batch_size, self.min_capacity))
        self.rows = list(range(batch_size))
        self.retired: set[int] = set()
        self.host_mask = torch.zeros(batch_size, self.capacity, dtype=torch.bool)
        self.host_lengths = [0] * batch_size
        self.T = 0
        self.dirty = True
        self._siblings: tuple[list[int], int] | None = None
        self._reset_counters(batch_size)

    def _alloc(self, kv: SlotCache) -> None:
        """(Re)build the device state around `kv`; graphs captured on older buffers are dropped."""
        self.kv = kv
        self.mask = torch.zeros(self.batch_size, kv.capacity, dtype=torch.bool, device=self.device)
        self.dev_lengths = torch.zeros(self.batch_size, dtype=torch.long, device=self.device)
        self.start = torch.zeros((), dtype=torch.long, device=self.device)
        self.arange = torch.arange(max(GRAPH_WIDTHS[-1], 64), device=self.device)
        self.steps: dict[tuple[int, bool, bool], _Step] = {}
        self.pool: Any = None  # the graphs' shared memory pool
        self.dirty = True
        self.captures = 0  # graphs captured so far (a benchmark reports captures inside its timing)

    @property
    def capacity(self) -> int:
        return self.kv.capacity

    @property
    def num_slots(self) -> int:
        return self.T

    def length(self, row: int) -> int:
        self._cache_row(row)
        return self.host_lengths[row]

    def _cache_row(self, row: int) -> int:
        if row in self.retired or not 0 <= row < self.batch_size:
            raise ValueError(f"row {row} was retired from the cache")
        return row

    @torch.no_grad()
    def extend(
        self, tokens: torch.Tensor, live: torch.Tensor, logits: bool = True, last_only: bool = False
    ) -> torch.Tensor | None:
        self._drop_siblings()
        tokens, live = tokens.cpu(), live.cpu().clone()
        live[list(self.retired)] = False
        n = tokens.shape[1]
        last = last_only or not logits
        width = n if last else next((w for w in GRAPH_WIDTHS if w >= n), n)
        if width > n:  # pad with dead tokens up to a captured width
            tokens = torch.cat([tokens, tokens.new_zeros(len(tokens), width - n)], 1)
            live = torch.cat([live, live.new_zeros(len(live), width - n)], 1)
        raw, hidden = self._step(tokens, live, tree=False, keep_last=last)
        self.host_mask[:, self.T - width : self.T] = live
        counts = live.sum(1).tolist()
        self.host_lengths = [a + b for a, b in zip(self.host_lengths, counts, strict=True)]
        self.dirty = True
        self._count(self.rows, [counts[r] for r in self.rows])
        self.last_hidden = hidden[:, :n].float() if self.want_hidden and hidden is not None else None
        self._compact_tail()
        if not logits:
            return None
        return raw.float() if last else raw[:, :n].float()  # a copy: the step's buffers are reused

    def truncate(self, row: int, length: int) -> None:
        self._drop_siblings()
        j = self._cache_row(row)
        live_slots = self.host_mask[j].nonzero().flatten()
        if length < len(live_slots):
            self.host_mask[j, int(live_slots[length]) :] = False
            self.host_lengths[j] = length
            self.dirty = True
        self._compact_tail()

    def retire(self, rows: Sequence[int]) -> None:
        self._drop_siblings()
        gone = [r for r in rows if r in self.rows]
        if not gone or len(gone) == len(self.rows):
            return  # like hf.py: the last rows are never retired (their caches die with the batch)
        self.retired |= set(gone)
        self.rows = [r for r in self.rows if r not in self.retired]
        self.host_mask[gone] = False
        self.dirty = True
        self._compact_tail()

    # -- siblings ----------------------------------------------------------------------------------
    @torch.no_grad()
    def score_siblings(self, rows: Sequence[int], cands: torch.Tensor, logits: bool = True) -> torch.Tensor | None:
        """One fixed-shape tree step over the whole batch (unlisted rows feed dead siblings): every listed row
        can then keep its winner without a further forward, whichever rows were listed."""
        self._drop_siblings()
        rows = list(rows)
        K = cands.shape[1]
        feed = torch.zeros(self.batch_size, K, dtype=torch.long)
        live = torch.zeros(self.batch_size, K, dtype=torch.bool)
        feed[rows], live[rows] = cands.cpu(), True
        raw, hidden = self._step(feed, live, tree=True, keep_last=not logits)
        self._siblings = (rows, self.T - K)
        self._count(rows, [K] * len(rows))
        back = torch.tensor(rows, device=self.device)
        self.last_hidden = hidden[back].float() if self.want_hidden and hidden is not None else None
        return raw[back].float() if logits else None

    def keep_siblings(self, picks: dict[int, int]) -> None:
        if self._siblings is None:
            raise ValueError("keep_siblings without a score_siblings before it")
        _, base = self._siblings
        self._siblings = None
        for r, pick in picks.items():
            self.host_mask[self._cache_row(r), base + pick] = True
            self.host_lengths[r] += 1
        self.dirty = True
        self._compact_tail()

    def _drop_siblings(self) -> None:
        if self._siblings is not None:
            self._siblings = None
            self._compact_tail()

    # -- the step ----------------------------------------------------------------------------------
    def _step(
        self, ids: torch.Tensor, live: torch.Tensor, tree: bool, keep_last: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Write ids [B, n] at columns T..T+n (after making room) and run the model: (logits, hidden) in
        the model's dtype, the step's own buffers (copy before the next step)."""
        n = ids.shape[1]
        self._make_room(n)
        if self.dirty:
            self.mask.copy_(self.host_mask)
            self.dev_lengths.copy_(torch.tensor(self.host_lengths))
            self.dirty = False
        self.start.fill_(self.T)
        key = (n, tree, keep_last)
        step = self.steps.get(key)
        if step is None:
            step = _Step(torch.zeros_like(ids, device=self.device), torch.zeros_like(live, device=self.device))
            self.steps[key] = step
        step.ids.copy_(ids)
        step.live.copy_(live)
        self.T += n
        if self.use_graphs and n <= GRAPH_WIDTHS[-1] and self.graph_error is None and self.kv.keys:
            if step.graph is None:  # (the first step, which allocates the buffers, runs eagerly)
                self._capture(step, tree, keep_last)
            if step.graph is not None:
                step.graph.replay()
                assert step.out is not None
                return step.out
        return self._forward(step.ids, step.live, tree, keep_last, self.want_hidden)

    def _forward(
        self, ids: torch.Tensor, live: torch.Tensor, tree: bool, keep_last: bool, hidden: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Device work only (capturable): positions, the additive mask [B, 1, n, cap], the model. Returns
        (logits [B, n or 1, V], final hidden states [B, n, H] or None without `hidden`)."""
        B, n = ids.shape
        cols = self.start + (self.arange[:n] if n <= len(self.arange) else torch.arange(n, device=ids.device))
        if tree:  # K siblings at the row's next position, each seeing the prefix and itself
            positions = self.dev_lengths[:, None].expand(B, n)
            among = torch.eye(n, dtype=torch.bool, device=ids.device).expand(B, n, n)
        else:
            positions = (self.dev_lengths[:, None] + live.long().cumsum(1) - 1).clamp(min=0)
            causal = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril()
            among = causal[None] & live[:, None, :]
        visible = self.mask[:, None, :].expand(B, n, self.capacity).clone()
        visible.index_copy_(2, cols, among.contiguous())
        additive = torch.zeros(visible.shape, dtype=self.dtype, device=ids.device)
        additive = additive.masked_fill(~visible, torch.finfo(self.dtype).min)[:, None]
        self.kv.cols = cols
        out = self.model(
            input_ids=ids,
            attention_mask=additive,
            position_ids=positions,
            cache=self.kv,
            use_cache=True,
            output_hidden_states=hidden,
            logits_to_keep=1 if keep_last else 0,
        )
        return out.logits, out.hidden_states[-1] if hidden else None

    def _capture(self, step: _Step, tree: bool, keep_last: bool) -> None:
        """Warm up on a side stream, then capture; a failure is recorded and the backend goes eager."""
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._forward(step.ids, step.live, tree, keep_last)  # writes what the replay writes again
            torch.cuda.current_stream().wait_stream(side)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                step.out = self._forward(step.ids, step.live, tree, keep_last)
            step.graph = graph
            self.captures += 1
        except Exception as e:  # any capture failure: the eager step computes the same
            self.graph_error = f"{type(e).__name__}: {e}"
            step.graph, step.out = None, None

    # -- room in the buffers -----------------------------------------------------------------------
    def _make_room(self, n: int) -> None:
        if self.T + n <= self.capacity:
            return
        self._compact()
        if self.T + n > self.capacity * 3 // 4:
            capacity = self.capacity
            while self.T + n > capacity * 3 // 4:
                capacity *= 2
            more = self.host_mask.new_zeros(self.batch_size, capacity - self.capacity)
            self.host_mask = torch.cat([self.host_mask, more], 1)
            self._alloc(self.kv.grown(capacity))

    def _compact(self) -> None:
        """Move each row's live slots to its first columns, in order; T becomes the longest row."""
        order = (~self.host_mask).to(torch.int8).argsort(dim=1, stable=True)
        self.kv.regroup(order.to(self.device))
        counts = self.host_mask.sum(1)
        self.host_mask = torch.arange(self.capacity)[None] < counts[:, None]
        self.T = int(counts.max()) if len(counts) else 0
        self.dirty = True

    def _compact_tail(self) -> None:
        """Columns past the last live one in any row are free again (the host mask says which)."""
        if self._siblings is not None:
            return
        alive = self.host_mask[:, : self.T].any(0).nonzero()
        self.T = int(alive.max()) + 1 if alive.numel() else 0
