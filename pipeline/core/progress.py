"""Bounded progress reports for long loops: a line every few seconds (and at the end), with an ETA,
instead of one event per neuron flooding the Dagster event log."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

Log = Callable[[str], None]


class Progress:
    """The ETA comes from the rate over the last few reports, not since the start: a rerun answers its
    first items from the response cache in a burst, and an average over it would promise minutes that
    the uncached rest takes much longer than."""

    WINDOW = 3  # the rate is measured over about this many of the latest reports

    def __init__(self, what: str, total: int, log: Log | None, every_s: float = 10.0):
        self.what, self.total, self.log, self.every_s = what, total, log, every_s
        self.done = 0
        self.start = self.last = time.monotonic()
        self.marks: deque[tuple[float, int]] = deque([(self.start, 0)], maxlen=self.WINDOW + 1)

    def step(self, n: int = 1, note: str = "") -> None:
        """Count n finished items; report when `every_s` passed since the last report, or at the end."""
        self.done += n
        now = time.monotonic()
        if self.log is None or (now - self.last < self.every_s and self.done < self.total):
            return
        self.last = now
        elapsed = now - self.start
        then, done_then = self.marks[0]
        self.marks.append((now, self.done))
        rate = (self.done - done_then) / (now - then) if now > then else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        tail = f", about {duration(eta)} left" if self.done < self.total else f" in {duration(elapsed)}"
        self.log(f"{self.what}: {self.done}/{self.total}{tail}" + (f" ({note})" if note else ""))


def duration(seconds: float) -> str:
    """'40 s', '12 min', '3.5 h'; '?' for NaN."""
    if seconds != seconds:  # NaN: nothing done yet
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
