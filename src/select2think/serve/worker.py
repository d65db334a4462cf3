"""The one thread that owns the models. HTTP handlers `submit` jobs (one row per prompt) and get events back
through `Job.post`; the worker decodes continuous batches: a batch runs one configuration, and between two
steps rows that finished leave while queued rows with the same configuration take their place (first come,
first served: a queued row of another configuration stops admission until the batch drains, then its
configuration runs next). Engines without row admission decode the rows queued at the start as one batch.

A decode that raises fails the requests it held (500) and the worker goes on with the next batch."""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..backends.base import Backend
from ..decoding.api import Decoder
from ..decoding.state import Arrival, Batch, DecodeStats, Generation, RowState
from ..decoding.teacher import step_logprobs

log = logging.getLogger("select2think.serve")


class QueueFull(Exception):
    """More rows would wait than --max-queue allows."""


@dataclass
class RowOptions:
    """Per-row settings a batch's rows may differ in."""

    max_new_tokens: int
    stop: tuple[str, ...] = ()
    bias: torch.Tensor | None = None  # [V] added to the proposer's text logits (allowed ids, logit bias)
    top_n: int | None = None  # log-probs of each token with the top-n (None: none)
    prompt_top_n: int | None = None  # prompt log-probs with the top-n (None: none)


@dataclass
class Finished:
    """A row's outcome, handed to its request: the generation, its log-probs, its prompt's log-probs."""

    gen: Generation
    logprobs: list[tuple[float, list[tuple[int, float]]]]
    prompt_logprobs: list[tuple[int, float, int, list[tuple[int, float]]]] | None


@dataclass
class Job:
    """One request. `post(event)` must be safe to call from the worker thread; events are
    ("token", i, text delta, token, logprob entry or None), ("done", i, Finished, the rest of the text) and
    ("error", status, message)."""

    decoder: Decoder
    key: str  # requests with equal keys share a batch
    prompts: list[list[int]]
    options: RowOptions
    post: Callable[[tuple], None]
    stream: bool = False
    cancelled: bool = False
    rows: list[RowState | None] = field(default_factory=list)

    def cancel(self) -> None:
        """The client left: queued rows are dropped, running rows finish at their next step."""
        self.cancelled = True
        for row in self.rows:
            if row is not None:
                row.cancelled = True


class TextStream:
    """Text deltas of a growing row: a trailing partial UTF-8 character or the start of a stop string is
    held back until the next tokens settle it, so the deltas always add up to the final text."""

    def __init__(self, stop: tuple[str, ...]):
        self.stop, self.sent = stop, 0

    def delta(self, row: RowState) -> str:
        if row.done:  # the final text (cut at a stop string) goes with the row's "done" event
            return ""
        ids = [t for t in row.gen.token_ids if t not in row.eos_ids]
        text = row.tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")
        hold = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        safe = text[: len(text) - hold]
        out, self.sent = safe[self.sent :], max(self.sent, len(safe))
        return out

    def rest(self, gen: Generation) -> str:
        return gen.text[self.sent :]


@dataclass
class _Row:
    job: Job
    index: int
    prompt: list[int]


@dataclass
class _Held:
    """A row in the batch: whose it is, its text stream, its prompt's log-probs if asked for."""

    item: _Row
    stream: TextStream
    prompt_logprobs: list | None = None


class Worker:
    def __init__(self, max_batch: int, max_queue: int, on_batch: Callable[[DecodeStats], None] | None = None):
        self.max_batch, self.max_queue = max_batch, max_queue
        self.on_batch = on_batch  # each batch's whole-call counters (metrics)
        self.queue: deque[_Row] = deque()
        self.cond = threading.Condition()
        self.running: dict[int, _Held] = {}  # id(row) -> its request
        self.key: str | None = None  # the running batch's configuration
        self.paused = False
        self.stopping = False
        self.scratch: dict[int, Backend] = {}  # a second cache per proposer, for prompt log-probs
        self.thread = threading.Thread(target=self._run, name="s2t-decode", daemon=True)

    # -- the HTTP side ---------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self.cond:
            if len(self.queue) + len(job.prompts) > self.max_queue:
                raise QueueFull(f"{len(self.queue)} rows are waiting (--max-queue {self.max_queue}); retry later")
            job.rows = [None] * len(job.prompts)
            self.queue.extend(_Row(job, i, p) for i, p in enumerate(job.prompts))
            self.cond.notify()

    def queued(self) -> int:
        return len(self.queue)

    def active(self) -> int:
        return len(self.running)

    def pause(self) -> None:
        """Stop starting batches and admitting rows (the running rows finish); `resume` undoes it."""
        with self.cond:
            self.paused = True

    def resume(self) -> None:
        with self.cond:
            self.paused = False
            self.cond.notify()

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout=10)

    # -- the batch's arrivals (decoding.state.Arrivals) -------------------------------------------------
    def take(self, free: int) -> list[Arrival]:
        out = []
        for item in self._pop(free):
            try:
                out.append(self._arrive(item))
            except Exception as e:  # this request alone fails (e.g. its prompt log-probs)
                self._fail(item.job, e)
        return out

    def leave(self, row: RowState) -> None:
        held = self.running.pop(id(row), None)
        if held is None or row.gen.finish_reason == "cancelled":
            return  # its request failed or its client left
        gen = row.finish()
        done = Finished(gen, row.logprobs, held.prompt_logprobs)
        held.item.job.post(("done", held.item.index, done, held.stream.rest(gen)))

    def _pop(self, free: int) -> list[_Row]:
        with self.cond:
            out: list[_Row] = []
            while self.queue and len(out) < free and not self.paused:
                item = self.queue[0]
                if item.job.cancelled:
                    self.queue.popleft()
                elif item.job.key == self.key:
                    out.append(self.queue.popleft())
                else:
                    break
            return out

    def _arrive(self, item: _Row) -> Arrival:
        job, opt = item.job, item.job.options
        stream = TextStream(opt.stop)

        def on_commit(row: RowState) -> None:
            if job.stream:
                entry = row.logprobs[-1] if row.top_n is not None else None
                job.post(("token", item.index, stream.delta(row), row.gen.token_ids[-1], entry))

        held = _Held(item, stream)
        if opt.prompt_top_n is not None:
            held.prompt_logprobs = self._prompt_logprobs(job.decoder, item.prompt, opt.prompt_top_n)
        row = job.decoder.row(opt.max_new_tokens, opt.stop, on_commit, bias=opt.bias, top_n=opt.top_n)
        job.rows[item.index] = row
        if job.cancelled:
            row.cancelled = True
        self.running[id(row)] = held
        return Arrival(item.prompt, row, item.index)

    def _prompt_logprobs(self, dec: Decoder, prompt: list[int], n: int) -> list:
        """Per prompt position after the first: (token, its log-prob, its rank from 1, the top-n)."""
        proposer = dec.proposer
        if id(proposer) not in self.scratch:
            self.scratch[id(proposer)] = proposer.spawn()
        if len(prompt) < 2:
            return []
        logp, _ = step_logprobs(self.scratch[id(proposer)], prompt[:1], prompt[1:], dec.vocab)
        out = []
        for pos, tok in enumerate(prompt[1:]):
            lp = logp[pos]
            top = lp.topk(n) if n else None
            rank = int((lp > lp[tok]).sum()) + 1
            pairs = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else []
            out.append((tok, float(lp[tok]), rank, pairs))
        return out

    # -- the thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and (self.paused or not self.queue):
                    self.cond.wait()
                if self.stopping:
                    return
                self.key = self.queue[0].job.key
                dec = self.queue[0].job.decoder
            try:
                self._batch(dec)
            except Exception as e:  # the requests in this batch fail; the server goes on
                log.error("decode failed: %s", traceback.format_exc())
                for held in list(self.running.values()):
                    self._fail(held.item.job, e)
                self.running.clear()
            finally:
                self.key = None

    def _batch(self, dec: Decoder) -> None:
        continuous = all(b.capabilities.admission for b in dec.backends)
        first = self.take(self.max_batch)
        if not first:
            return
        size = self.max_batch if continuous else len(first)
        free = size - len(first)
        batch = Batch(
            [a.prompt for a in first] + [[] for _ in range(free)],
            dec.vocab,
            dec.policy,
            [a.row for a in first] + [RowState.free() for _ in range(free)],
            [a.seed for a in first] + [0] * free,
            dec.pad_id,
            arrivals=self if continuous else None,
        )
        t0 = time.perf_counter()
        rows, stats = dec.run(batch)
        for row in rows:
            if not row.vacant:
                self.leave(row)
        stats.wall_time_s = time.perf_counter() - t0
        if self.on_batch is not None:
            self.on_batch(stats)

    def _fail(self, job: Job, e: Exception) -> None:
        if not job.cancelled:
            job.cancelled = True  # its other rows stop too
            for row in job.rows:
                if row is not None:
                    row.cancelled = True
            job.post(("error", 500, f"the decode failed: {type(e).__name__}: {e}"))
