"""Offline continuous batching: a list of prompts decoded through `batch_size` slots, each slot taking the
next waiting prompt as soon as its row finishes, so a batch never waits on its longest row.

The decode loops already admit newcomers between steps (`Batch.admit`, written for the server); this is
the same mechanism fed from a list instead of a request queue."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from .record import StepRecorder, Steps
from .state import Arrival, Batch, Generation, RowState


class PromptQueue:
    """The `Arrivals` of an offline batch: prompts in order, each finished row handed to `on_finish` with
    its prompt's index as soon as it leaves."""

    def __init__(
        self,
        prompts: list[list[int]],
        seeds: list,
        new_row: Callable[[], RowState],
        on_finish: Callable[[int, Generation], None] | None = None,
    ):
        self.prompts, self.seeds, self.new_row, self.on_finish = prompts, seeds, new_row, on_finish
        self.waiting = deque(range(len(prompts)))
        self.index: dict[int, int] = {}  # id(row) -> its prompt's index, while it decodes
        self.done: dict[int, Generation] = {}

    def take(self, free: int) -> list[Arrival]:
        out: list[Arrival] = []
        while self.waiting and len(out) < free:
            i = self.waiting.popleft()
            row = self.new_row()
            self.index[id(row)] = i
            out.append(Arrival(self.prompts[i], row, self.seeds[i]))
        return out

    def leave(self, row: RowState) -> None:
        i = self.index.pop(id(row))
        self.done[i] = gen = row.finish()
        if self.on_finish is not None:
            self.on_finish(i, gen)

    def batch(self, size: int, make: Callable[..., Batch], recorder: StepRecorder | None) -> Batch:
        """The first `size` prompts in a continuous batch of `size` slots (`make`: Batch's other fields)."""
        first = self.take(size)
        free = size - len(first)
        rows = [a.row for a in first] + [RowState.free() for _ in range(free)]
        prompts = [a.prompt for a in first] + [[] for _ in range(free)]
        seeds = [a.seed for a in first] + [0] * free
        batch = make(prompts, rows, seeds)
        batch.arrivals = self
        batch.recorder = Slots(recorder, self, batch) if recorder is not None else None
        return batch


class Slots:
    """A recorder seen by a continuous batch: the batch's slots become the prompts' indices."""

    def __init__(self, inner: StepRecorder, queue: PromptQueue, batch: Batch):
        self.inner, self.queue, self.batch = inner, queue, batch
        self.wants_hidden = inner.wants_hidden

    def record(self, steps: Steps) -> None:
        steps.rows = [self.queue.index[id(self.batch.rows[r])] for r in steps.rows]
        self.inner.record(steps)
