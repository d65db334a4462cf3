"""Per-row bookkeeping shared by the reference loop and the fast paths: committing tokens,
stopping rules and the statistics every generation reports."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..backends.base import Backend
from .vocab import Vocab

if TYPE_CHECKING:
    from .policy import Policy
    from .record import StepRecorder


@dataclass
class Generation:
    """One prompt's output and its per-row counters."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""  # eos | stop | length
    triggers: int = 0
    flips: int = 0  # emitted token != SLM top-1
    hits: int = 0  # LLM full argmax inside SLM top-K, at triggered steps
    hit_checked: int = 0
    slm_forwards: int = 0  # forwards this row took part in (batched rows share them)
    llm_forwards: int = 0
    slm_tokens: int = 0  # tokens of this row each model processed (prompt, drafts and rollbacks included)
    llm_tokens: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DecodeStats:
    """Whole-call counters. Forwards count model calls (one call serves the whole batch)."""

    slm_forwards: int = 0
    llm_forwards: int = 0
    slm_tokens: int = 0
    llm_tokens: int = 0  # live tokens the LLM processed, prompts included
    llm_requests: int = 0  # HTTP requests to a remote LLM (retries included; backends/remote.py)
    generated_tokens: int = 0
    triggers: int = 0
    flips: int = 0
    hits: int = 0
    hit_checked: int = 0
    wall_time_s: float = 0.0

    @classmethod
    def of_rows(cls, gens: Sequence[Generation], wall_time_s: float = 0.0) -> DecodeStats:
        """Some rows' own counters summed (their forwards are the model calls they took part in)."""
        shared = {f.name for f in fields(Generation)}
        stats = cls(generated_tokens=sum(len(g.token_ids) for g in gens), wall_time_s=wall_time_s)
        for f in fields(cls):
            if f.name in shared:
                setattr(stats, f.name, sum(getattr(g, f.name) for g in gens))
        return stats

    def with_rows(self, gens: Sequence[Generation]) -> DecodeStats:
        """These whole-call counters with the per-row ones (tokens, triggers, flips, hits) of `gens`."""
        own = DecodeStats.of_rows(gens)
        for name in ("generated_tokens", "triggers", "flips", "hits", "hit_checked"):
            setattr(self, name, getattr(own, name))
        return self

    def __add__(self, other: DecodeStats) -> DecodeStats:
        return DecodeStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    @property
    def trigger_rate(self) -> float:
        return self.triggers / max(self.generated_tokens, 1)

    @property
    def flip_rate(self) -> float:
        return self.flips / max(self.generated_tokens, 1)

    @property
    def hit_at_k(self) -> float | None:
        return self.hits / self.hit_checked if self.hit_checked else None

    @property
    def llm_forwards_per_token(self) -> float:
        return self.llm_forwards / max(self.generated_tokens, 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            trigger_rate=self.trigger_rate,
            flip_rate=self.flip_rate,
            hit_at_k=self.hit_at_k,
            llm_forwards_per_token=self.llm_forwards_per_token,
        )
        return d


class RowState:
    """Commits tokens for one row and decides when it is finished.

    `bias` [V] is added to the proposer's text logits of this row at every step (allowed ids, logit bias);
    with `top_n` (0 or more) the rows decoded step by step keep each chosen token's log-prob and the top-n
    (`logprobs`).
    `cancelled` may be set from any thread (its client left): the row then finishes at its next commit."""

    def __init__(
        self,
        tokenizer,
        eos_ids: set[int] | frozenset[int],
        stop: tuple[str, ...],
        max_new_tokens: int,
        on_commit=None,
        bias: torch.Tensor | None = None,
        top_n: int | None = None,
    ):
        self.gen = Generation()
        self.tokenizer, self.eos_ids, self.stop, self.max_new = tokenizer, eos_ids, stop, max_new_tokens
        self.done = False
        self.vacant = False  # a free row of a continuous batch (Batch.admit)
        self.cancelled = False
        self.on_commit = on_commit  # called with this row after every token, e.g. to stream text
        self.bias, self.top_n = bias, top_n
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] = []  # per token: (its log-prob, top-n)

    @classmethod
    def free(cls) -> RowState:
        """A vacant row: done, nobody's."""
        row = cls(None, frozenset(), (), 1)
        row.done = row.vacant = True
        return row

    @property
    def step(self) -> int:
        return len(self.gen.token_ids)

    @property
    def remaining(self) -> int:
        return self.max_new - self.step

    def commit(self, token: int, fired: bool, flipped: bool, hit: bool | None) -> bool:
        """Append one token; return True if the row is now finished."""
        g = self.gen
        g.token_ids.append(token)
        g.triggers += int(fired)
        g.flips += int(flipped)
        if hit is not None:
            g.hits += int(hit)
            g.hit_checked += 1
        if self.cancelled:
            self.done, g.finish_reason = True, "cancelled"
        elif token in self.eos_ids:
            self.done, g.finish_reason = True, "eos"
        elif self.stop and any(s in self._text() for s in self.stop):
            self.done, g.finish_reason = True, "stop"
        elif self.step >= self.max_new:
            self.done, g.finish_reason = True, "length"
        if self.on_commit is not None:
            self.on_commit(self)
        return self.done

    def keep_logprobs(self, logp: torch.Tensor, token: int) -> None:
        """Before committing `token`: its log-prob and the top-n of the step's log-probs [V]."""
        top = logp.topk(self.top_n or 0)
        self.logprobs.append((float(logp[token]), list(zip(top.indices.tolist(), top.values.tolist(), strict=True))))

    def _text(self) -> str:
        return self.tokenizer.decode(self.gen.token_ids[-64:], skip_special_tokens=True)

    def finish(self) -> Generation:
        ids = [t for t in self.gen.token_ids if t not in self.eos_ids]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if self.gen.finish_reason == "stop":
            cut = min(text.find(s) for s in self.stop if s in text) if any(s in text for s in self.stop) else len(text)
            text = text[:cut]
        self.gen.text = text
        return self.gen


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, T] and live mask [B, T], left padded (an empty prompt is an all-dead row)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    live = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        live[i, width - len(p) :] = True
    return ids, live


def charge(row: RowState, i: int, slm: Sequence[Backend] = (), llm: Sequence[Backend] = ()) -> None:
    """Add batch row i's per-row costs to the row's counters: each model role's costs are the sum over the
    backends that did that role's work (the LLM policy's proposer is the LLM; decoupled S2T-Local's scorer
    is SLM work)."""
    for role, backends in (("slm", slm), ("llm", llm)):
        for b in backends:
            setattr(row.gen, f"{role}_forwards", getattr(row.gen, f"{role}_forwards") + b.row_forwards[i])
            setattr(row.gen, f"{role}_tokens", getattr(row.gen, f"{role}_tokens") + b.row_tokens[i])


def totals(rows: list[RowState], t0: float, slm: Sequence[Backend] = (), llm: Sequence[Backend] = ()) -> DecodeStats:
    """Whole-call counters (forwards and tokens of the backends of each role, `charge`) and per-row ones."""
    stats = DecodeStats()
    for role, backends in (("slm", slm), ("llm", llm)):
        for b in backends:
            setattr(stats, f"{role}_forwards", getattr(stats, f"{role}_forwards") + b.forwards)
            setattr(stats, f"{role}_tokens", getattr(stats, f"{role}_tokens") + b.tokens)
            stats.llm_requests += b.requests if role == "llm" else 0
    for i, r in enumerate(rows):
        charge(r, i, slm, llm)
    stats.wall_time_s = time.perf_counter() - t0
    return stats.with_rows([r.gen for r in rows])


@dataclass
class StepView:
    """The rows still decoding at one step: their SLM log-probs [N, V], step indices [N] and seed keys."""

    active: list[int]
    idx: torch.Tensor
    slm_logp: torch.Tensor
    steps: torch.Tensor
    keys: list


def shaped(rows: list[RowState], which: list[int], logits: torch.Tensor) -> torch.Tensor:
    """The proposer's text logits [N, V] of rows `which` with each row's `bias` added."""
    if all(rows[r].bias is None for r in which):
        return logits
    zero = logits.new_zeros(logits.shape[-1])
    biases = [rows[r].bias for r in which]
    return logits + torch.stack([zero if b is None else b.to(logits) for b in biases])


def active_view(rows: list[RowState], s_logits: torch.Tensor, row_seeds) -> StepView | None:
    active = [r for r in range(len(rows)) if not rows[r].done]
    if not active:
        return None
    idx = torch.tensor(active, device=s_logits.device)
    s_lp = shaped(rows, active, s_logits[idx]).log_softmax(-1)
    steps = [rows[r].step for r in active]
    keys = [(row_seeds[r], s) for r, s in zip(active, steps, strict=False)]
    return StepView(active, idx, s_lp, torch.tensor(steps, device=s_lp.device), keys)


def to_host(*xs: torch.Tensor) -> list[list[int]]:
    """Equal-length [N] tensors read back in one transfer: one host synchronisation, not one per value."""
    dev = xs[0].device
    return torch.stack([x.to(dev, torch.long) for x in xs]).tolist()


def commit_step(rows: list[RowState], view: StepView, tokens, fired, flips, hits, pad_id: int):
    """Commit one token per active row; return the feed [B, 1] and live mask [B, 1] for rows that go on."""
    B = len(rows)
    feed = torch.full((B, 1), pad_id, dtype=torch.long)
    live = torch.zeros((B, 1), dtype=torch.bool)
    toks, fs, fl, *hs = to_host(tokens, fired, flips, *([hits] if hits is not None else []))
    for j, r in enumerate(view.active):
        f = bool(fs[j])
        hit = bool(hs[0][j]) if (f and hs) else None
        t = toks[j]
        if rows[r].top_n is not None:
            rows[r].keep_logprobs(view.slm_logp[j], t)
        if not rows[r].commit(t, f, bool(fl[j]), hit):
            feed[r, 0], live[r, 0] = t, True
    return feed, live


@dataclass
class Arrival:
    """A newcomer to a continuous batch: its prompt's token ids, its row and its seed key."""

    prompt: list[int]
    row: RowState
    seed: Any


class Arrivals(Protocol):
    """Where a continuous batch finds newcomers and hands finished rows back (the server's queue)."""

    def take(self, free: int) -> list[Arrival]:
        """At most `free` newcomers that may join now; never blocks."""
        ...

    def leave(self, row: RowState) -> None:
        """A finished row, its costs charged."""
        ...


@dataclass
class Batch:
    """What every decode loop is given: prompts [B] of token ids, their rows and how to decode them.

    With `arrivals` the batch is continuous: between two steps every loop calls `admit`, and rows that
    finished leave while newcomers take their place (`join` prefills them). An empty prompt is a free row."""

    prompts: list[list[int]]
    vocab: Vocab
    policy: Policy
    rows: list[RowState]
    row_seeds: list
    pad_id: int
    recorder: StepRecorder | None = None  # sees every committed step (decoding.record)
    arrivals: Arrivals | None = None

    @property
    def wants_hidden(self) -> bool:
        """The recorder keeps the SLM's hidden states, or the trigger reads them (a learned trigger)."""
        return (self.recorder is not None and self.recorder.wants_hidden) or self.policy.trigger.needs_hidden

    def start_hidden(self, backend: Backend) -> torch.Tensor | None:
        """After `start`: the final hidden states [B, H] at each prompt's last token, if they are wanted."""
        return backend.hidden()[:, -1] if self.wants_hidden else None

    def next_hidden(self, backend: Backend, live: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor | None:
        """After `next_logits` with live [B, 1]: live rows' new final hidden states [B, H], the others' kept."""
        if hidden is None:
            return None
        return torch.where(live.to(hidden.device), backend.hidden()[:, -1].to(hidden.device), hidden)

    def start(self, backend: Backend) -> tuple[list[RowState], torch.Tensor]:
        """The rows, and the backend's text logits [B, V] after prefilling the prompts (free rows retired)."""
        backend.reset(len(self.prompts))
        ids, live = left_pad(self.prompts, self.pad_id)
        logits = self.next_logits(backend, ids, live)
        backend.retire([r for r, p in enumerate(self.prompts) if not p])
        return self.rows, logits

    def next_logits(self, backend: Backend, ids: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """Extend by ids/live [B, n]; the text logits [B, V] after each row's last token."""
        raw = backend.extend(ids, live, last_only=True)
        assert raw is not None
        return self.vocab.text_logits(raw[:, -1])

    def admit(self, roles: dict[str, list[Backend]]) -> list[int]:
        """Continuous batching, between two steps: finished rows, their costs charged from `roles` (`charge`),
        go back to their owner, and newcomers take the free rows. Returns the newcomers' rows."""
        if self.arrivals is None:
            return []
        free = []
        for r, row in enumerate(self.rows):
            if row.done and not row.vacant:
                charge(row, r, **roles)
                self.arrivals.leave(row)
                self.rows[r] = RowState.free()
            if self.rows[r].vacant:
                free.append(r)
        new = self.arrivals.take(len(free))
        for r, a in zip(free, new, strict=False):
            self.rows[r], self.prompts[r], self.row_seeds[r] = a.row, list(a.prompt), a.seed
        return free[: len(new)]

    def join(
        self, backend: Backend, new: list[int], logits: torch.Tensor, hidden: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows `new` start over in `backend` with their prompts: `logits` [B, V] (and `hidden` [B, H], if
        kept) take the newcomers' values at those rows."""
        for r in new:
            backend.admit(r)
        ids, live = left_pad([self.prompts[r] if r in new else [] for r in range(len(self.prompts))], self.pad_id)
        got = self.next_logits(backend, ids, live)
        mask = live[:, -1:].to(logits.device)
        logits = torch.where(mask, got, logits)
        if hidden is not None:
            hidden = torch.where(mask.to(hidden.device), backend.hidden()[:, -1].to(hidden.device), hidden)
        return logits, hidden
