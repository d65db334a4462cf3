"""Progress for long runs: a rich bar on a terminal; elsewhere (nohup, CI, a pipe) a plain line every
`every` seconds on stderr: `eval gsm8k: 12/41 done, 0.21/s, about 2m18s left`."""

from __future__ import annotations

import sys
import time
from typing import Any


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """`with Progress("eval", total, completed) as p: ... p.advance(n)`. Disabled: silent."""

    def __init__(
        self, desc: str, total: int, completed: int = 0, enabled: bool = True, every: float = 30.0, stream=None
    ):
        self.desc, self.total, self.done, self.every = desc, total, completed, every
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and sys.stdout.isatty() and self.stream.isatty()
        self._bar: Any = None
        self._start_done = completed

    def __enter__(self) -> Progress:
        self.t0 = self.last = time.monotonic()
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
            self._bar.__enter__()
            self._task = self._bar.add_task(self.desc, total=self.total, completed=self.done)
        elif self.enabled:
            self._log(f"{self.desc}: {self.done}/{self.total} done, starting")
        return self

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.advance(self._task, n)
        elif self.enabled and time.monotonic() - self.last >= self.every:
            self._log(self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        rate = (self.done - self._start_done) / elapsed
        left = f"about {_duration((self.total - self.done) / rate)} left" if rate > 0 else "time left unknown"
        return f"{self.desc}: {self.done}/{self.total} done, {rate:.3g}/s, {left}"

    def _log(self, text: str) -> None:
        self.last = time.monotonic()
        print(text, file=self.stream, flush=True)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
        elif self.enabled and exc[0] is None:
            self._log(f"{self.desc}: {self.done}/{self.total} done in {_duration(time.monotonic() - self.t0)}")
